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


def test_vgg_pretraining_resumes_where_it_stopped_and_its_trunk_starts_cam_vgg_synth(tmp_path: Path) -> None:
    """benchmarks/pretrain_vgg.py: stopped at step 2 and resumed, a run ends with the weights of a straight one;
    ``--init`` starts a later stage from its file."""
    import pretrain_vgg

    from wsss.models import build_model, load_checkpoint, load_pretrained
    from wsss.train.configs import get_config, model_spec

    small = ["--images", "12", "--val-images", "6", "--max-objects", "2", "--batch", "4", "--every", "2",
             "--threads", "1"]  # fmt: skip
    common = [*small, "--iters", "4"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    pretrain_vgg.main([*common, "--work", str(straight), "--json", str(tmp_path / "a.json")])
    pretrain_vgg.main([*common, "--work", str(stopped), "--max-steps", "2", "--json", str(tmp_path / "b.json")])
    pretrain_vgg.main([*common, "--work", str(stopped), "--resume", "--json", str(tmp_path / "b.json")])
    assert [row["step"] for row in json.loads((tmp_path / "a.json").read_text())["log"]] == [2, 4]
    assert [row["step"] for row in json.loads((tmp_path / "b.json").read_text())["log"]] == [2, 4]
    a, meta = load_checkpoint(straight / "vgg-tiny-synth.safetensors")
    b, _ = load_checkpoint(stopped / "vgg-tiny-synth.safetensors")
    assert meta["steps"] == 4 and meta["kind"] == "vgg_trunk" and "pretrain_vgg.py" in meta["command"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-3), key
    with pytest.raises(SystemExit, match="same --iters"):
        pretrain_vgg.main([*small, "--iters", "6", "--work", str(straight), "--resume"])
    model = build_model(model_spec(get_config("cam-vgg-synth"), ("background", "a")))
    report = load_pretrained(model, straight / "vgg-tiny-synth.safetensors").check()
    assert report.loaded == len(model.backbone.state_dict())
    # --init: a second stage starts its trunk from the first's file (lr ~0 keeps it there) and records it
    first = straight / "vgg-tiny-synth.safetensors"
    pretrain_vgg.main([*small, "--iters", "2", "--lr", "1e-12", "--init", str(first), "--work", str(tmp_path / "s2"),
                      "--json", str(tmp_path / "c.json")])  # fmt: skip
    c, meta2 = load_checkpoint(tmp_path / "s2" / "vgg-tiny-synth.safetensors")
    assert meta["init"] is None and meta2["init"] == str(first)
    for key in a:
        if "running" not in key and "num_batches" not in key:  # BN statistics move at any lr
            assert torch.allclose(a[key].float(), c[key].float(), atol=1e-3), key
