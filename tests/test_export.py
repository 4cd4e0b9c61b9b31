"""Export: ONNX parity at dynamic, off-grid sizes, the spec in the metadata, backends, official SeCo import, the CoBra
two-group graph, refusals (hostile, truncated and pre-spec files) and TensorRT gating.

Official CoBra checkpoint pairs are tested in test_official_cobra.py."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import pytest
import torch

from wsss.cam.pipeline import predict_cams
from wsss.export.onnx import FP32_TOLERANCE, export_onnx, read_metadata, verify_onnx
from wsss.export.run import run_export
from wsss.models import CAMSettings, CheckpointError, ModelSpec, build_model, load_model, save_model
from wsss.models.checkpoint import file_sha256
from wsss.runtime.backends import OnnxBackend, TorchBackend, open_backend
from wsss.runtime.labeler import LabelConfig, check_source

TINY = {"name": "vit_tiny_patch16_224", "img_size": 32, "overrides": {"patch_size": 8, "depth": 2, "embed_dim": 48,
                                                                        "num_heads": 2}}  # fmt: skip
CLASSES = ("background", "boat", "train", "cow")
ODD = [(32, 32), (61, 93), (20, 35)]  # the stored grid, a 281 x 500-like size and a small one, both off the grid


def _spec(family: str = "cam", backbone: dict | None = None) -> ModelSpec:
    arch = {"backbone": backbone or TINY, **({"aux_layer": -1} if family == "seco" else {})}  # F_aux of 2 blocks
    if family == "cobra":
        arch |= {"proj_dim": 16, "cnn": {"name": "custom", "layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32],
                                         "block": "basic", "strides": [1, 2, 1, 1], "fixed_bn": False}}  # fmt: skip
    cam = {"input_size": 32, "scales": [1.0]} if family != "cobra" else {"scales": [1.0, 1.5]}
    return ModelSpec(family, arch, CLASSES, CAMSettings.for_family(family, cam))


def _model(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec).eval()


def _worst(rows: list[dict]) -> float:
    return max(r["max_rel"] for r in rows)


@pytest.fixture(scope="module")
def cam_ckpt(tmp_path_factory):
    model = _model(_spec())
    return save_model(tmp_path_factory.mktemp("ckpt") / "cam.safetensors", model, model.spec, step=3)


def test_run_export_verifies_off_grid_sizes_and_the_spec_round_trips(cam_ckpt, tmp_path):
    lines: list[str] = []
    out = tmp_path / "cam.onnx"
    assert run_export(cam_ckpt, onnx_path=out, normalize=True, verify=True, echo=lines.append) == [out]
    assert "(wsss): loaded" in lines[0] and "parity OK" in lines[-1]
    parity = [line.split() for line in lines if line.strip().startswith("ORT vs torch")]
    assert {r[3] for r in parity} == {"2x3x32x32", "2x3x20x35", "2x3x49x41"}  # off the patch-8 grid but the first
    assert {r[5] for r in parity} == {"logits", "cams", "cams_norm"}
    loaded = load_model(cam_ckpt)
    spec, props = read_metadata(out)
    assert spec == loaded.spec and props["outputs"] == ["logits", "cams", "cams_norm"]
    assert props["source_sha256"] == loaded.meta["source_sha256"] == file_sha256(cam_ckpt) and props["input"] == "image"
    assert not {"method", "class_names", "mean", "std", "cam_settings"} & set(props)
    assert "cams_norm" in onnx.load(str(out)).doc_string
    assert _worst(verify_onnx(loaded.model, out, ODD, batch=3)) < FP32_TOLERANCE

    backend, backend_spec, meta = open_backend(engine=out)
    assert isinstance(backend, OnnxBackend) and backend_spec == backend.spec == spec
    assert meta["artifact_sha256"] == file_sha256(out) and meta["source_sha256"] == props["source_sha256"]
    torch_backend, torch_spec, torch_meta = open_backend(cam_ckpt)
    assert torch_spec == spec and torch_meta["step"] == 3
    x = torch.randn(2, 3, 61, 93)
    got, want = backend(x), torch_backend(x)
    assert len(got) == len(want) == 2 and got[1].shape == (2, 3, 7, 11)  # cams_norm is not a network output
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (61, 93, 3), dtype=np.uint8), rng.integers(0, 255, (40, 33, 3), dtype=np.uint8)]
    tags = [None, np.array([1, 0, 1], np.float32)]
    for a, b in zip(predict_cams(backend, images, tags, spec.cam), predict_cams(torch_backend, images, tags, spec.cam),
                    strict=True):  # fmt: skip
        assert torch.equal(a.tags, b.tags) and a.cam.shape == b.cam.shape == (3, *a.seed.shape)
        torch.testing.assert_close(a.cam, b.cam, atol=1e-4, rtol=0)


def official_seco_state(model, ddp: bool) -> dict[str, torch.Tensor]:
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


def test_official_seco_import_and_segmentation_export(tmp_path):
    source = _model(_spec("seco"), seed=1)
    x = torch.randn(2, 3, 37, 45)
    for ddp in (False, True):
        path = tmp_path / f"seco{ddp:d}.pth"
        torch.save(official_seco_state(source, ddp), path)
        loaded = load_model(path, arch=source.spec.arch)
        report = loaded.report
        assert report.layout == "seco" and not report.missing and not report.unexpected
        assert report.loaded == len(source.state_dict())
        assert len(report.skipped) == len(source.backbone.state_dict()) + 7  # encoder_k.*, head, proj heads, buffers
        assert loaded.spec.class_names == ("background", "class_1", "class_2", "class_3")
        assert loaded.meta["source_sha256"] == file_sha256(path)
        with torch.no_grad():
            for a, b in zip(loaded.model(x), source(x), strict=True):
                torch.testing.assert_close(a, b)
            torch.testing.assert_close(loaded.model.segment(x), source.segment(x))
    out = tmp_path / "seg.onnx"
    assert export_onnx(loaded.model, loaded.spec, out, what="seg", meta=loaded.meta).outputs == ["seg"]
    assert _worst(verify_onnx(loaded.model, out, ODD)) < FP32_TOLERANCE
    seg = OnnxBackend(out)  # serves `wsss label --source seg`, and is refused as a CAM source
    assert seg.what == "seg"
    with pytest.raises(ValueError, match="needs a cam network output"):
        check_source(seg, LabelConfig())
    with pytest.raises(CheckpointError, match="this is a SeCo checkpoint"):
        load_model(path, vit_path=path)


def test_cobra_graph_has_two_cam_groups_on_their_own_grids(tmp_path):
    spec = _spec("cobra", {**TINY, "pos_resize": "size"})  # the DINO rule has its own test below
    model = _model(spec)
    out = tmp_path / "cobra.onnx"
    result = export_onnx(model, spec, out, normalize=True)
    assert result.outputs == ["logits", "cams_cnn", "cams_vit", "cams_norm"]
    assert _worst(verify_onnx(model, out, ODD)) < FP32_TOLERANCE
    backend = OnnxBackend(out)
    logits, cams_cnn, cams_vit = backend(torch.randn(1, 3, 61, 93))
    assert logits.shape == (1, 3) and cams_cnn.shape == (1, 3, 8, 12) and cams_vit.shape == (1, 4, 7, 11)
    assert backend.spec.cam.background == "attention_percentile"


def test_dino_position_rule_exports_with_dynamic_shapes(tmp_path):
    spec = _spec("cam", {**TINY, "pos_resize": "dino"})
    model = _model(spec)
    export_onnx(model, spec, tmp_path / "dino.onnx")  # refused unless the graph runs at a second size
    assert _worst(verify_onnx(model, tmp_path / "dino.onnx", [*ODD, (33, 33)])) < FP32_TOLERANCE


def test_pre_spec_onnx_files_are_refused_in_one_line(tmp_path):
    image = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["B", 3, "H", "W"])
    logits = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", 3, "H", "W"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["image"], ["logits"])], "g", [image], [logits])
    proto = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(proto, {"method": "cam", "class_names": json.dumps(CLASSES), "patch_size": "8"})
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    for fn in (read_metadata, OnnxBackend, lambda p: open_backend(engine=p)):
        with pytest.raises(ValueError, match="re-export") as err:
            fn(old)
        assert "\n" not in str(err.value)


class Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_hostile_and_truncated_checkpoints_are_refused(tmp_path, cam_ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "evil.pth"
    with open(hostile, "wb") as f:
        pickle.dump({"encoder.pos_embed": Boom()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(hostile)
    assert not (tmp_path / "PWNED").exists()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(cam_ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(truncated)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        run_export(truncated, echo=lambda _: None)
    assert list(tmp_path.glob("*.onnx")) == []


def test_refusals_before_any_work(cam_ckpt, tmp_path):
    with pytest.raises(ValueError, match="BATCHx3xHEIGHTxWIDTH"):
        run_export(cam_ckpt, shapes=("1x3x224", "4x3x448x448", "8x3x672x672"))
    with pytest.raises(CheckpointError, match="official CoBra pairs only"):
        run_export(cam_ckpt, vit_ckpt=cam_ckpt, echo=lambda _: None)
    with pytest.raises(ValueError, match="no segmentation head"):
        run_export(cam_ckpt, what="seg", echo=lambda _: None)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"pip install 'wsss\[gpu\]'"):
            run_export(cam_ckpt, onnx_path=tmp_path / "a.onnx", trt_path="auto")
    assert not (tmp_path / "a.onnx").exists()


def test_torch_backend_takes_the_networks_spec():
    spec = _spec()
    backend = TorchBackend(_model(spec))
    assert backend.spec == spec and backend.patch_size == 8
    renamed = TorchBackend(_model(spec), spec=spec.replace(class_names=("background", "a", "b", "c")))
    assert renamed.spec.class_names[1] == "a"
    assert [t.shape for t in backend(torch.randn(1, 3, 20, 35))] == [(1, 3), (1, 3, 2, 4)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU; none on this machine")
def test_tensorrt_engine_matches_onnxruntime(cam_ckpt, tmp_path):
    pytest.importorskip("tensorrt", reason="pip install 'wsss[gpu]' to test TensorRT")
    written = run_export(cam_ckpt, onnx_path=tmp_path / "m.onnx", trt_path="auto", verify=True,
                         shapes=("1x3x32x32", "2x3x61x93", "2x3x64x96"))  # fmt: skip
    engine = written[-1]
    assert engine.suffix == ".engine"
    sidecar = json.loads(engine.with_suffix(".engine.json").read_text())
    assert sidecar["spec"] == load_model(cam_ckpt).spec.to_dict() and sidecar["outputs"] == ["logits", "cams"]
    assert sidecar["profile"]["max"] == [2, 3, 64, 96]
    backend, spec, meta = open_backend(engine=engine, device="cuda")
    x = torch.randn(5, 3, 61, 93, device="cuda")  # beyond the profile's batch of 2: runs in chunks
    want = OnnxBackend(tmp_path / "m.onnx")(x.cpu())
    got = backend(x)
    assert len(got) == 2 and meta["artifact_sha256"] == file_sha256(engine)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-3, rtol=1e-3)
    assert backend.runner.stream.cuda_stream != torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match=r"outside the TensorRT profile .*--max-shape 2x3x64x128"):
        backend(torch.randn(1, 3, 64, 128, device="cuda"))
