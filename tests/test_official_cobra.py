"""Official CoBra checkpoints: the two-file import by key table, alias merging, refusals, ONNX export and the
ONNX Runtime backend's seeds against PyTorch's."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from test_cobra import TINY_COBRA
from torch import nn

from wsss.cam.infer import CAMSettings, predict_cams
from wsss.cli import cli
from wsss.export.onnx import CAMGraph, read_metadata
from wsss.models import CheckpointError, build_model, official
from wsss.models.official import (
    COBRA_CNN_KEYS,
    _map_aliased,
    _resnet_config,
    detect_method,
    load_any,
    load_official_cobra,
)
from wsss.runtime.backends import OnnxBackend, TorchBackend, meta_from_props
from wsss.train.configs import CONFIGS, get_config

NUM_FG = 3
# The tiny CoBra network with a Bottleneck ResNet, so that its keys have the official (torchvision) block names.
CFG = get_config("cobra-tiny-synth", [*TINY_COBRA, "model.cnn.block=bottleneck"])
TINY_VIT = CFG["model"]["backbone"]
STRIDES = {"strides": CFG["model"]["cnn"]["strides"]}  # patch 8: output stride 8, not the official 16


class OfficialCNN(nn.Module):
    """The module structure of the official ``net/resnet50_cam.py: Net`` around a given ResNet, registered in the
    same order, so that ``state_dict()`` writes the same aliased keys PyTorch writes for the official file."""

    def __init__(self, resnet: nn.Module, classifier: nn.Module, embed: nn.Module):
        super().__init__()
        self.resnet50 = resnet
        self.stage1 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool, resnet.layer1)
        self.stage2 = nn.Sequential(resnet.layer2)
        self.stage3 = nn.Sequential(resnet.layer3)
        self.stage4 = nn.Sequential(resnet.layer4)
        self.classifier = classifier
        self.embed = embed
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])


def official_vit_state(model) -> dict[str, torch.Tensor]:
    """``net/deit_cam.py: TSCAM.state_dict()``: DeiT with timm names, the 3x3 ``head`` and the SAP ``embed``."""
    state = dict(model.backbone.state_dict())
    state.update({"head.weight": model.vit_classifier.weight.detach(), "head.bias": model.vit_classifier.bias.detach(),
                  "embed.weight": model.vit_proj.weight.detach()})  # fmt: skip
    return state


def source_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("cobra", CFG["model"], NUM_FG)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(source model, CNN file, ViT file), the files named as train_cam.py names them."""
    model = source_model()
    folder = tmp_path_factory.mktemp("cobra")
    cnn, vit = folder / "ep19_cnn_checkpoint.pth", folder / "ep19_tf_checkpoint.pth"
    torch.save(OfficialCNN(model.cnn.net, model.cnn_classifier, model.cnn_proj).state_dict(), cnn)
    torch.save(official_vit_state(model), vit)
    return model, cnn, vit


def _import(cnn, vit, **kwargs):
    return load_official_cobra(cnn, vit, num_fg=NUM_FG, cnn=STRIDES, vit=TINY_VIT, **kwargs)


@pytest.fixture
def tiny_base(monkeypatch):
    """The importer's base config (the paper's DeiT-S + ResNet-152) swapped for the tiny one, so that the entry
    points without config arguments (load_any, the CLI) can import the tiny pair."""
    monkeypatch.setitem(CONFIGS, "cobra-tiny-official-test", CFG)
    monkeypatch.setattr(official, "COBRA_CONFIG", "cobra-tiny-official-test")


def test_official_layout_has_the_expected_aliases(pair):
    model, cnn, vit = pair
    keys = list(torch.load(cnn, weights_only=True))
    trunk = len(model.cnn.net.state_dict())
    assert len(keys) == 3 * trunk + 2 + 1  # resnet50.*, stage1..4.*, backbone.*; classifier x2, embed
    for key in ("resnet50.layer3.0.conv3.weight", "stage1.0.weight", "stage1.1.running_var", "stage1.4.0.bn2.bias",
                "stage4.0.0.downsample.1.weight", "backbone.2.0.0.conv1.weight", "newly_added.0.weight"):  # fmt: skip
        assert key in keys
    assert detect_method(keys) == "cobra"
    assert detect_method(list(torch.load(vit, weights_only=True))) == "cobra-vit"
    assert detect_method(["module." + k for k in keys]) == "cobra"


def test_import_matches_source_outputs_and_metadata(pair):
    source, cnn, vit = pair
    model, meta, report = _import(cnn, vit)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == [] and report.initialised == []
    assert report.loaded == len(source.state_dict())
    assert report.aliases == 2 * len(source.cnn.net.state_dict()) + 1
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    read = {"name": "custom", "layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32], "block": "bottleneck"}
    assert meta["model"]["cnn"] == {**read, "strides": [1, 2, 1, 1], "fixed_bn": True, "frozen_stages": 2}
    assert meta["model"]["proj_dim"] == 16 and meta["method"] == "cobra"
    assert meta["class_names"] == ["background", "class_1", "class_2", "class_3"]
    cam = meta["config"]["cam"]
    assert cam["source"] == "fuse" and cam["bg_percentile"] == 70.0 and cam["input_size"] is None
    assert len(cam["scales"]) == 7 and meta["config"]["model"] == meta["model"]
    assert len(meta["source_sha256"]) == 64 and len(meta["source_sha256_vit"]) == 64
    assert meta["source_sha256"] != meta["source_sha256_vit"]
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        for a, b in zip(model(x), source(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(model(x, mode="train")[1:], source(x, mode="train")[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddp_prefix_and_wrappers_are_accepted(pair, tmp_path):
    source, cnn, vit = pair
    state = torch.load(cnn, weights_only=True)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ep1_cnn_checkpoint.pth")
    torch.save({"model": torch.load(vit, weights_only=True)}, tmp_path / "ep1_tf_checkpoint.pth")
    model, _, _ = _import(tmp_path / "ep1_cnn_checkpoint.pth", tmp_path / "ep1_tf_checkpoint.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1], source(x)[1], rtol=0, atol=0)


def test_resnet_depth_is_read_from_the_official_layout():
    """The paper's ResNet-152 and its siblings, in the official aliased layout (shapes only, on the meta device)."""
    for name, layer3 in (("resnet50", 6), ("resnet101", 23), ("resnet152", 36)):
        with torch.device("meta"):
            net = timm.create_model(name, num_classes=0, global_pool="")
            state = OfficialCNN(net, nn.Conv2d(2048, 21, 1, bias=False), nn.Conv2d(2048, 256, 1, bias=False))
            state = state.state_dict()
        assert sum(k.startswith("resnet50.layer3.") and k.endswith(".conv1.weight") for k in state) == layer3
        mapped, skipped, unexpected, _ = _map_aliased(state, COBRA_CNN_KEYS, name)
        assert skipped == [] and unexpected == []
        assert _resnet_config(mapped, name) == {"name": name}
        assert mapped["cnn_classifier.weight"].shape == (21, 2048, 1, 1)


def test_load_any_finds_the_partner_file_and_takes_either_file_first(pair, tmp_path, tiny_base):
    source, cnn, vit = pair
    x = torch.randn(1, 3, 32, 40)
    lonely = tmp_path / "weights.pth"
    lonely.write_bytes(cnn.read_bytes())
    with torch.no_grad():
        want = source(x)[1]
        for args in ((cnn,), (vit,), (lonely, "auto", vit), (vit, "cobra", lonely)):
            model, meta, report = load_any(*args)
            assert report.loaded == len(source.state_dict()) and meta["imported_from"]["vit"] == str(vit)
            torch.testing.assert_close(model(x)[1], want, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="two files.*--vit-ckpt"):
        load_any(lonely)
    with pytest.raises(CheckpointError, match="expected the CNN"):
        _import(vit, cnn)
    with pytest.raises(CheckpointError, match="expected the ViT"):
        load_any(cnn, vit_path=lonely)


def test_missing_projection_is_initialised_deterministically(pair, tmp_path):
    source, cnn, vit = pair
    state = torch.load(cnn, weights_only=True)
    del state["embed.weight"]
    torch.save(state, tmp_path / "cnn.pth")
    a, _, report = _import(tmp_path / "cnn.pth", vit)
    b, _, _ = _import(tmp_path / "cnn.pth", vit)
    assert report.initialised == ["cnn_proj.weight"] and "initialised" in str(report)
    assert torch.equal(a.cnn_proj.weight, b.cnn_proj.weight)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x)[1], source(x)[1], rtol=0, atol=0)  # CAMs never use the projections


def test_disagreeing_aliases_missing_and_mismatched_tensors_are_refused(pair, tmp_path):
    _, cnn, vit = pair
    state = torch.load(cnn, weights_only=True)
    bad = dict(state)
    bad["stage3.0.0.conv1.weight"] = state["stage3.0.0.conv1.weight"] + 1
    torch.save(bad, tmp_path / "aliases.pth")
    with pytest.raises(CheckpointError, match=r"resnet50.layer3.0.conv1.weight and stage3.0.0.conv1.weight"):
        _import(tmp_path / "aliases.pth", vit)
    bad = dict(state)
    bad["newly_added.0.weight"] = torch.randn_like(state["classifier.weight"])
    torch.save(bad, tmp_path / "classifier.pth")
    with pytest.raises(CheckpointError, match="aliases of one tensor"):
        _import(tmp_path / "classifier.pth", vit)
    missing = {k: v for k, v in state.items() if not k.endswith("layer4.0.bn3.running_var")
               and not k.startswith(("stage4.0.0.bn3.running_var", "backbone.3.0.0.bn3.running_var"))}  # fmt: skip
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): cnn.net.layer4.0.bn3.running_var"):
        _import(tmp_path / "missing.pth", vit)
    vit_state = torch.load(vit, weights_only=True)
    vit_state["head.weight"] = torch.randn(NUM_FG + 1, 48, 1, 1)  # a 1x1 head is not CoBra's 3x3
    torch.save(vit_state, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"mismatched .*vit_classifier.weight"):
        _import(cnn, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"3 \+ 1 channels, not 20 \+ 1"):
        load_official_cobra(cnn, vit, cnn=STRIDES, vit=TINY_VIT)


class Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_hostile_and_truncated_files_are_refused(pair, tmp_path, monkeypatch):
    _, cnn, vit = pair
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "ep19_cnn_checkpoint.pth"
    with open(hostile, "wb") as f:
        pickle.dump({"resnet50.conv1.weight": Boom()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        _import(hostile, vit)
    with pytest.raises(CheckpointError, match="refused"):
        _import(cnn, hostile)
    assert not (tmp_path / "PWNED").exists()
    truncated = tmp_path / "cut_cnn_checkpoint.pth"
    truncated.write_bytes(cnn.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _import(truncated, vit)
    result = CliRunner().invoke(cli, ["export", "--ckpt", str(truncated), "--vit-ckpt", str(vit)])
    assert result.exit_code == 1 and "truncated or corrupt" in result.output


def test_cli_refuses_segmentation_export_before_any_work(pair, tmp_path, tiny_base):
    _, cnn, _ = pair
    seg = CliRunner().invoke(cli, ["export", "--ckpt", str(cnn), "--what", "both", "--onnx", str(tmp_path / "x")])
    assert seg.exit_code == 1 and "no segmentation head" in seg.output and not list(tmp_path.iterdir())


def test_cobra_normalized_output_is_the_fused_seed_map():
    model = source_model(1)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        logits, cams, norm = CAMGraph(model, normalize=True)(x)
    k = NUM_FG
    assert cams.shape == (2, 2 * k + 1, 4, 5) and norm.shape == (2, k + 1, 4, 5)
    for c in range(k):  # (4.19) on ReLU(M) / (max M + 1e-5) of each source, no min subtracted
        a, b = (cams[:, i].relu() / (cams[:, i].relu().amax((-2, -1), keepdim=True) + 1e-5) for i in (c, k + c))
        torch.testing.assert_close(norm[:, c], torch.maximum((a + b) / 2, b))
    torch.testing.assert_close(norm[:, k], cams[:, 2 * k].relu())  # A_obj at its own scale


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64] / 48
    base = np.stack([np.sin(5 * xx + c) * np.cos(3 * yy - c) for c in range(3)], -1)
    img = ((base + 0.3 * rng.standard_normal(base.shape)) * 80 + 128).clip(0, 255).astype(np.uint8)
    return [img, img[:40, :56].copy(), img[5:38, 9:56].copy()]


def test_cli_export_verify_and_onnx_backend_seeds_match_torch(pair, tmp_path, tiny_base):
    pytest.importorskip("onnxruntime")
    _, cnn, vit = pair
    model, meta, _ = load_any(cnn, vit_path=vit)
    out = tmp_path / "cobra.onnx"
    args = ["export", "--ckpt", str(cnn), "--vit-ckpt", str(vit), "--onnx", str(out), "--normalize", "--verify"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and "parity OK" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip().startswith("ORT vs torch")]
    assert {r[3] for r in rows} == {"2x3x48x48", "2x3x24x48", "2x3x72x56"}  # native CAM size: the ViT's 48
    assert {r[5] for r in rows} == {"logits", "cams", "cams_norm"}
    props = read_metadata(out)
    assert props["method"] == "cobra" and json.loads(props["outputs"]) == ["logits", "cams", "cams_norm"]
    assert props["source_sha256"] == meta["source_sha256"] and props["source_sha256_vit"] == meta["source_sha256_vit"]

    backend = OnnxBackend(out)
    onnx_meta = meta_from_props(backend.props)
    assert onnx_meta["config"]["cam"] == meta["config"]["cam"] and onnx_meta["class_names"] == meta["class_names"]
    images = _images()
    tags = [None, np.array([1, 0, 1], np.float32), None]
    for settings in (CAMSettings(**{**onnx_meta["config"]["cam"], "scales": (1.0, 0.5, 1.5, 2.0)}),
                     CAMSettings(**{**onnx_meta["config"]["cam"], "input_size": 48, "source": "max"})):  # fmt: skip
        want = predict_cams(TorchBackend(model), images, tags, settings)
        got = predict_cams(backend, images, tags, settings)
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a.tags, b.tags)
            torch.testing.assert_close(a.cam, b.cam, atol=1e-4, rtol=0)
            assert np.array_equal(a.seed, b.seed)
            assert len(np.unique(a.seed)) > 1  # not a trivial all-background seed
