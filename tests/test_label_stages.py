"""The labeler's dense-CRF implementations, its stage timeline and its bounded CAM output."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from wsss import cli as cli_module
from wsss.cam.crf import refine_seed_crf
from wsss.cam.pipeline import CAMResult
from wsss.cli import cli
from wsss.data.palette import read_label_png
from wsss.runtime import labeler
from wsss.runtime.labeler import STAGES, LabelConfig, _refine_crf, crf_implementation

CRF_IMPL_AGREEMENT = 0.999  # torch lattice vs pydensecrf: the same lattice, only float summation order differs
FLOAT16_ATOL = 2e-3  # CAMs in [0, 1] stored as float16


def _label(*args) -> None:
    result = CliRunner().invoke(cli, ["label", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _labels(folder) -> dict[str, np.ndarray]:
    return {p.stem: read_label_png(p) for p in sorted(folder.glob("*.png"))}


def _summary(out) -> dict:
    return json.loads((out / "summary-shard-0-of-1.json").read_text())


def test_torch_crf_labels_equal_pydensecrf_and_the_timeline_shows_the_pool(synth, tiny_ckpt, tmp_path):
    base = ["--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--refine", "crf", "--batch", 4, "--quiet"]
    for impl in ("torch", "pydensecrf"):
        _label(*base, "--crf-impl", impl, "--out", tmp_path / impl)
    a, b = _labels(tmp_path / "torch" / "labels"), _labels(tmp_path / "pydensecrf" / "labels")
    assert a.keys() == b.keys() and len(a) == 6
    assert sum(np.sum(a[k] == b[k]) for k in a) / sum(a[k].size for k in a) >= CRF_IMPL_AGREEMENT
    for impl in ("torch", "pydensecrf"):
        summary = _summary(tmp_path / impl)
        assert summary["crf_impl"] == impl and summary["ok"] == 6
        line = summary["timeline"]
        assert set(line) == {*STAGES, "bound_by"} and line["bound_by"] in STAGES
        assert all(line[s]["busy_s"] > 0 for s in STAGES)  # the CRF is timed in its worker, the rest where it runs
        assert line["refine"]["lanes"] == 2 and line["forward"]["lanes"] == 1
        assert 0 < line["refine"]["busy_fraction"] <= 1.05  # busy / (lanes x wall), clock noise aside
        merged = json.loads((tmp_path / impl / "summary.json").read_text())
        assert merged["timeline"]["refine"]["busy_s"] == line["refine"]["busy_s"] and merged["crf_impl"] == impl


def test_without_refinement_the_refine_stage_is_idle(synth, tiny_ckpt, tmp_path):
    _label("--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--refine", "none", "--quiet", "--out", tmp_path)
    summary = _summary(tmp_path)
    assert summary["crf_impl"] is None and summary["timeline"]["refine"]["busy_s"] == 0
    assert summary["timeline"]["forward"]["busy_s"] > 0 and "cam_s" in summary["stages_s"]


def test_auto_picks_torch_on_a_gpu_and_pydensecrf_on_a_cpu(monkeypatch):
    crf = LabelConfig(refine="crf")
    assert crf_implementation(crf, "cuda:0") == "torch" and crf_implementation(crf, "cpu") == "pydensecrf"
    assert crf_implementation(LabelConfig(refine="par"), "cpu") is None
    monkeypatch.setattr(labeler.importlib.util, "find_spec", lambda name: None)  # pydensecrf not installed
    assert crf_implementation(crf, "cpu") == "torch"
    with pytest.raises(RuntimeError, match="--crf-impl pydensecrf: .*pip install"):
        crf_implementation(LabelConfig(refine="crf", crf_impl="pydensecrf"), "cpu")
    assert cli_module.CRF_IMPLS == labeler.CRF_IMPLS


def test_batched_device_crf_equals_pydensecrf_image_by_image():
    """The path a GPU takes (one batched call on the backend's device), run here on the CPU."""
    rng = np.random.default_rng(0)
    shapes, tags = [(20, 24), (17, 30), (20, 24)], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1]])
    samples = [SimpleNamespace(image=rng.integers(0, 255, (*s, 3), dtype=np.uint8)) for s in shapes]
    seeds = [torch.from_numpy(rng.integers(0, 4, s).astype(np.uint8)) for s in shapes]
    results = [CAMResult(None, t, seed) for t, seed in zip(tags, seeds, strict=True)]
    got = _refine_crf(samples, results, "cpu")
    for sample, res, label in zip(samples, results, got, strict=True):
        want = refine_seed_crf(sample.image, res.seed.numpy(), res.tags.numpy())
        assert label.dtype == torch.uint8 and np.mean(label.numpy() == want) >= CRF_IMPL_AGREEMENT


def test_saved_cams_are_float16_and_downscaled_on_request(synth, tiny_ckpt, tmp_path):
    base = ["--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--refine", "none", "--save-cams", "--quiet"]
    _label(*base, "--out", tmp_path / "full")
    _label(*base, "--out", tmp_path / "quarter", "--cams-scale", 0.25)
    for path in sorted((tmp_path / "full" / "cams").glob("*.npz")):
        full, small = np.load(path), np.load(tmp_path / "quarter" / "cams" / path.name)
        assert full["cams"].dtype == small["cams"].dtype == np.float16
        h, w = full["image_size"]
        assert full["cams"].shape[1:] == (h, w) and small["cams"].shape[1:] == (round(h / 4), round(w / 4))
        want = F.interpolate(torch.from_numpy(full["cams"]).float()[None], size=small["cams"].shape[1:],
                             mode="bilinear", align_corners=False)[0]  # fmt: skip
        np.testing.assert_allclose(small["cams"].astype(np.float32), want.numpy(), atol=FLOAT16_ATOL)
    bad = CliRunner().invoke(cli, list(map(str, ["label", *base, "--out", tmp_path / "bad", "--cams-scale", 0])))
    assert bad.exit_code == 2 and "--cams-scale" in bad.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the torch CRF batched on a CUDA GPU; none here")
def test_cuda_labeler_crf_matches_pydensecrf_on_the_cpu(synth, tiny_ckpt, tmp_path):
    """GPU check: --refine crf on cuda:0 (auto: the torch lattice on the device, only uint8 labels copied back)."""
    base = ["--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--refine", "crf", "--quiet"]
    _label(*base, "--out", tmp_path / "cpu", "--crf-impl", "pydensecrf")
    _label(*base, "--out", tmp_path / "cuda", "--device", "cuda:0")
    a, b = _labels(tmp_path / "cpu" / "labels"), _labels(tmp_path / "cuda" / "labels")
    assert a.keys() == b.keys() and a
    assert sum(np.sum(a[k] == b[k]) for k in a) / sum(a[k].size for k in a) >= CRF_IMPL_AGREEMENT
    summary = _summary(tmp_path / "cuda")
    assert summary["crf_impl"] == "torch" and summary["timeline"]["refine"]["lanes"] == 1
