"""Export: ONNX parity at dynamic sizes, metadata, official SeCo import, hostile files, TensorRT gating.

Official CoBra checkpoints (two files) and CoBra exports are tested in test_official_cobra.py."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from click.testing import CliRunner

from wsss.cli import cli
from wsss.export.onnx import export_onnx, read_metadata, verify_onnx
from wsss.models import CAMNet, CheckpointError, SeCoNet, save_checkpoint
from wsss.models.backbone import BackboneConfig
from wsss.models.official import detect_method, import_seco, load_any

TINY = {"name": "vit_tiny_patch16_224", "img_size": 32, "overrides": {"patch_size": 8, "depth": 3, "embed_dim": 48,
                                                                        "num_heads": 2}}  # fmt: skip
CLASSES = ["background", "boat", "train", "cow"]
SIZES = [(32, 32), (24, 40), (48, 56)]


def _meta(method: str) -> dict:
    return {"method": method, "model": {"backbone": TINY}, "class_names": CLASSES, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "config": {"cam": {"input_size": 32, "scales": [1.0], "flip": True,
                                                              "bkg_thresh": 0.3, "score_thresh": 0.5}}}  # fmt: skip


@pytest.fixture(scope="module")
def cam_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = CAMNet(BackboneConfig(**TINY), 3)
    path = tmp_path_factory.mktemp("ckpt") / "cam.safetensors"
    save_checkpoint(path, model.state_dict(), _meta("cam"))
    return path


def test_cam_onnx_parity_at_three_sizes_and_metadata(cam_ckpt, tmp_path):
    model, meta, report = load_any(cam_ckpt)
    assert report is None and len(meta["source_sha256"]) == 64
    out = tmp_path / "cam.onnx"
    result = export_onnx(model, meta, out, normalize=True)
    assert result.opset >= 17 and result.outputs == ["logits", "cams", "cams_norm"]
    rows = verify_onnx(model, out, SIZES, batch=2, normalize=True)
    assert {r["size"] for r in rows} == {"2x3x32x32", "2x3x24x40", "2x3x48x56"}
    assert max(r["max_rel"] for r in rows) < 1e-4
    props = read_metadata(out)
    assert json.loads(props["class_names"]) == CLASSES and props["patch_size"] == "8" and props["method"] == "cam"
    assert props["source_sha256"] == meta["source_sha256"] and props["input"] == "image"


def official_seco_state(model: SeCoNet, ddp: bool) -> dict[str, torch.Tensor]:
    """A state dict laid out like the official SeCo ``network`` (model/model_seco.py, read for its key names):
    the student under ``encoder.*`` with timm-style names and a ``head``, a key encoder ``encoder_k.*``, two DINO
    heads ``proj_head(_t).*``, the classifiers, ``decoder.c0..c3`` and the contrastive buffers."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            state["encoder." + key[9:]] = value
            state["encoder_k." + key[9:]] = value + 1  # different values: must be ignored
        else:
            state[key] = value
    dim = model.backbone.embed_dim
    state["encoder.head.weight"] = torch.randn(1000, dim)
    state["proj_head.mlp.0.weight"] = torch.randn(16, dim)
    state["proj_head_t.last_layer.weight_g"] = torch.randn(16, 1)
    state.update(prototypes=torch.randn(3, 16), queue=torch.randn(24, 16), queue_label_flag=torch.zeros(24, 1),
                 queue_ptr=torch.zeros(1, dtype=torch.long))  # fmt: skip
    return {("module." + k if ddp else k): v for k, v in state.items()}


@pytest.mark.parametrize("ddp", [False, True])
def test_official_seco_import_matches_source(tmp_path, ddp):
    torch.manual_seed(1)
    source = SeCoNet(BackboneConfig(**TINY), 3).eval()
    path = tmp_path / "seco.pth"
    torch.save(official_seco_state(source, ddp), path)
    assert detect_method(list(torch.load(path, weights_only=True))) == "seco"
    model, meta, report = import_seco(torch.load(path, weights_only=True), str(path), backbone=TINY)
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(source.state_dict())
    assert len(report.skipped) == len(source.backbone.state_dict()) + 7  # encoder_k.*, head, proj heads, buffers
    assert meta["class_names"] == ["background", "class_1", "class_2", "class_3"]
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        for a, b in zip(model(x), source(x), strict=True):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(model.segment(x), source.segment(x))
        torch.testing.assert_close(model.aux_outputs(x)[1], source.aux_outputs(x)[1])


def test_seco_import_reports_shape_mismatch(tmp_path):
    state = official_seco_state(SeCoNet(BackboneConfig(**TINY), 3), ddp=False)
    state["decoder.c0.weight"] = torch.randn(4, 48, 1, 1)
    with pytest.raises(CheckpointError, match=r"mismatched .*decoder.c0.weight"):
        import_seco(state, "x.pth", backbone=TINY)


def test_seco_segmentation_export_parity(tmp_path):
    torch.manual_seed(2)
    model = SeCoNet(BackboneConfig(**TINY), 3).eval()
    out = tmp_path / "seg.onnx"
    assert export_onnx(model, _meta("seco"), out, what="seg").outputs == ["seg"]
    rows = verify_onnx(model, out, SIZES, batch=2, what="seg")
    assert max(r["max_rel"] for r in rows) < 1e-4


class Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_hostile_and_truncated_checkpoints_are_refused(tmp_path, cam_ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "evil.pth"
    with open(hostile, "wb") as f:
        pickle.dump({"encoder.pos_embed": Boom()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_any(hostile)
    assert not (tmp_path / "PWNED").exists()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(cam_ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_any(truncated)
    result = CliRunner().invoke(cli, ["export", "--ckpt", str(truncated)])
    assert result.exit_code == 1 and "truncated or corrupt" in result.output


def test_trt_without_tensorrt_says_which_extra(cam_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; the missing-package message cannot be shown")
    except ImportError:
        pass
    result = CliRunner().invoke(cli, ["export", "--ckpt", str(cam_ckpt), "--trt", "--onnx", str(tmp_path / "a.onnx")])
    assert result.exit_code == 1 and "pip install 'wsss[gpu]'" in result.output
    assert not (tmp_path / "a.onnx").exists()  # refused before any work


def test_cli_export_verify_and_bad_shape(cam_ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", "--ckpt", str(cam_ckpt), "--onnx", str(out), "--verify"])
    assert result.exit_code == 0, result.output
    assert "parity OK" in result.output and out.is_file()
    bad = CliRunner().invoke(cli, ["export", "--ckpt", str(cam_ckpt), "--min-shape", "1x3x224"])
    assert bad.exit_code == 1 and "BATCHx3xHEIGHTxWIDTH" in bad.output


def test_vit_ckpt_is_for_official_cobra_pairs_only(cam_ckpt, tmp_path):
    result = CliRunner().invoke(cli, ["export", "--ckpt", str(cam_ckpt), "--vit-ckpt", str(cam_ckpt)])
    assert result.exit_code == 1 and "official CoBra checkpoints only" in result.output
    seco = tmp_path / "seco.pth"
    torch.save(official_seco_state(SeCoNet(BackboneConfig(**TINY), 3), ddp=False), seco)
    with pytest.raises(CheckpointError, match="this is a seco checkpoint"):
        load_any(seco, vit_path=seco)
    assert detect_method(["resnet50.conv1.weight", "stage1.0.weight", "classifier.weight"]) == "cobra"
    assert detect_method(["pos_embed", "blocks.0.attn.qkv.weight", "head.weight", "embed.weight"]) == "cobra-vit"
    with pytest.raises(CheckpointError, match="unrecognised"):
        detect_method(["pos_embed", "blocks.0.attn.qkv.weight", "head.weight"])  # a plain timm ViT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU; none on this machine")
def test_tensorrt_engine_matches_onnxruntime(cam_ckpt, tmp_path):
    pytest.importorskip("tensorrt", reason="pip install 'wsss[gpu]' to test TensorRT")
    from wsss.export.run import run_export

    written = run_export(cam_ckpt, onnx_path=tmp_path / "m.onnx", trt_path="auto", verify=True,
                         shapes=("1x3x32x32", "2x3x32x40", "2x3x48x56"))  # fmt: skip
    assert written[-1].suffix == ".engine" and written[-1].with_suffix(".engine.json").is_file()
