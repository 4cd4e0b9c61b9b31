"""benchmarks/learnability.py: its average precision and one short run per trunk kind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learnability  # noqa: E402

from wsss.data.probe import ProbeConfig, generate_probe  # noqa: E402


def _ap_by_definition(scores: list[float], positives: list[bool]) -> float:
    """Mean over positives of the precision among items scored at least as high (distinct scores)."""
    ranked = sorted(zip(scores, positives, strict=True), reverse=True)
    precisions = [sum(p for _, p in ranked[: i + 1]) / (i + 1) for i, (_, p) in enumerate(ranked) if p]
    return sum(precisions) / len(precisions)


def test_average_precision_matches_its_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randperm(30, generator=gen).float()
        positives = torch.rand(30, generator=gen) < 0.3
        positives[0] = True
        assert learnability.average_precision(scores, positives) == pytest.approx(
            _ap_by_definition(scores.tolist(), positives.tolist())
        )
    assert learnability.average_precision(torch.arange(4.0), torch.tensor([0, 0, 1, 1]).bool()) == 1.0
    assert torch.isnan(torch.tensor(learnability.average_precision(torch.arange(3.0), torch.zeros(3).bool())))


def test_a_short_run_of_each_trunk_kind_writes_its_log(tmp_path: Path) -> None:
    data = tmp_path / "probe"
    generate_probe(data, ProbeConfig(n_train=16, n_val=8, min_size=64, max_size=72, seed=2), progress=False)
    trunks = ["resnet-tiny", "vit-tiny-vgg", "vgg"]
    learnability.main(["--data", str(data), "--trunks", *trunks, "--epochs", "2", "--every", "1", "--batch", "8",
                       "--size", "64", "--threads", "1", "--name", "t", "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "learnability_t.json").read_text())
    assert [r["trunk"] for r in result["runs"]] == trunks
    for run in result["runs"]:
        assert [row["step"] for row in run["log"]] == [2, 4]
        assert len(run["log"][-1]["ap"]) == 7 and 0 <= run["log"][-1]["map"] <= 1
    assert (tmp_path / "learnability_t.png").stat().st_size > 0
