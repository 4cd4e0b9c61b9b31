"""The tiny VGG trunk of ``cam-vgg-synth``: its grid, its weights through the one loader, its refusals."""

from __future__ import annotations

import pytest
import torch

from wsss.models import CheckpointError, build_model, load_pretrained
from wsss.models.vgg import VGGConfig, VGGTrunk, load_vgg_weights
from wsss.train.configs import get_config, model_spec

CLASSES = ("background", "a", "b", "c")


def vgg_cam(**arch):
    cfg = get_config("cam-vgg-synth")
    cfg["model"]["backbone"].update(arch)
    return build_model(model_spec(cfg, CLASSES))


@pytest.mark.parametrize("size", [(112, 112), (117, 100), (63, 70)])
def test_cam_grid_floors_like_a_stride_8_patch_grid(size):
    model = vgg_cam().eval()
    logits, cams = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 3) and cams.shape == (1, 3, size[0] // 8, size[1] // 8)
    assert model.spec.patch_size == 8


def test_gmp_logits_are_the_max_of_the_feature_map():
    model = vgg_cam().eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.features(x)
    logits, cams = model(x)
    assert torch.allclose(logits, model.classifier(feats.amax((2, 3), keepdim=True)).flatten(1), atol=1e-6)
    assert torch.allclose(cams, model.classifier(feats), atol=1e-6)


def test_output_stride_follows_the_pools():
    assert VGGConfig(pools=2).output_stride == 4
    with pytest.raises(ValueError, match="output_stride"):  # the arch's stride disagrees with the trunk's
        build_model(model_spec(get_config("cam-vgg-synth", ["model.output_stride=4"]), CLASSES))


class _EveryOther(torch.nn.Module):
    def forward(self, x):
        return x[..., ::2, ::2]


def test_dilating_a_pool_keeps_the_weights_and_what_each_layer_sees():
    pooled, dilated = VGGTrunk(VGGConfig()).eval(), VGGTrunk(VGGConfig(dilate=1)).eval()
    assert dilated.output_stride == 4 and sorted(dilated.state_dict()) == sorted(pooled.state_dict())
    for m in pooled.modules():  # non-trivial BN statistics, so the check covers every layer
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    dilated.load_state_dict(pooled.state_dict())
    x = torch.randn(2, 3, 64, 72)
    assert dilated(x).shape[-2:] == (16, 18) and pooled(x).shape[-2:] == (8, 9)
    # a trous: with the last pool read as "every other pixel", the dilated map at even positions is the pooled one
    last_pool = max(i for i, m in enumerate(pooled.body) if isinstance(m, torch.nn.MaxPool2d))
    pooled.body[last_pool] = _EveryOther()
    assert torch.allclose(dilated(x)[..., ::2, ::2], pooled(x), atol=1e-5)
    cfg = get_config("cam-vgg-synth", ["model.backbone.dilate=1", "model.output_stride=4"])
    model = build_model(model_spec(cfg, CLASSES)).eval()
    assert model.spec.patch_size == 4 and model(x)[1].shape[-2:] == (16, 18)


def test_a_hypercolumn_stacks_the_tapped_stages_on_the_first_tapped_grid():
    plain, hyper = VGGTrunk(VGGConfig()).eval(), VGGTrunk(VGGConfig(taps=2)).eval()
    assert sorted(hyper.state_dict()) == sorted(plain.state_dict()) and hyper.output_stride == 4
    hyper.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 61, 74)
    out = hyper(x)
    assert out.shape == (2, 64 + 128, 61 // 4, 74 // 4) and hyper.out_channels == 192
    stage3 = plain.body[: plain.stage_ends[2] + 1](x)  # the third stage's map, before its pool
    last = torch.nn.functional.interpolate(plain(x), size=stage3.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, torch.cat([stage3, last], 1))
    assert VGGConfig(taps=3).output_stride == 2 and VGGConfig(taps=2, dilate=1).output_stride == 4
    cfg = get_config("cam-vgg-synth", ["model.backbone.taps=2", "model.output_stride=4"])
    model = build_model(model_spec(cfg, CLASSES)).eval()
    assert model.spec.patch_size == 4 and model(x)[1].shape == (2, 3, 15, 18)


@pytest.mark.parametrize("bad", [{"width": 0}, {"pools": 5}, {"convs": 0}, {"dilate": 4}, {"taps": 0}, {"taps": 5}])
def test_bad_trunk_settings_are_refused(bad):
    with pytest.raises(ValueError, match="VGG trunk"):
        VGGConfig(**bad)
    with pytest.raises(ValueError, match="unknown VGG trunk settings"):
        VGGConfig.from_dict({"kind": "vgg", "depth": 3})


@pytest.mark.parametrize("prefix", ["", "backbone.", "module.backbone."])
def test_trunk_weights_load_under_any_wrapper(tmp_path, prefix):
    source = VGGTrunk(VGGConfig())
    path = tmp_path / "trunk.pth"
    torch.save({f"{prefix}{k}": v for k, v in source.state_dict().items()}, path)
    model = vgg_cam()
    report = load_pretrained(model, path).check()
    assert report.loaded == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_wrong_files_are_refused_in_one_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="no tensor matches a VGG trunk"):
        load_vgg_weights(VGGTrunk(VGGConfig()), path)
    wide = tmp_path / "wide.pth"
    torch.save(VGGTrunk(VGGConfig(width=8)).state_dict(), wide)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_pretrained(vgg_cam(), wide).check()


def test_export_and_labeling_take_the_vgg_network(tmp_path):
    """The ONNX export of a cam-vgg-synth checkpoint matches torch off the stride-8 grid, and both backends give the
    same CAMs through the one CAM path."""
    import numpy as np

    from wsss.cam.pipeline import predict_cams
    from wsss.export.run import run_export
    from wsss.models import save_model
    from wsss.runtime.backends import open_backend

    torch.manual_seed(0)
    model = vgg_cam().eval()
    ckpt = save_model(tmp_path / "vgg.safetensors", model, model.spec, step=1)
    lines: list[str] = []
    onnx_path = tmp_path / "vgg.onnx"
    assert run_export(ckpt, onnx_path=onnx_path, normalize=True, verify=True, echo=lines.append) == [onnx_path]
    assert "parity OK" in lines[-1] and any(line.startswith("note: cam.layers=[1, 2] (LayerCAM)") for line in lines)
    onnx_backend, spec, _ = open_backend(engine=onnx_path)
    torch_backend, _, _ = open_backend(ckpt)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (61, 93, 3), dtype=np.uint8), rng.integers(0, 255, (117, 100, 3), dtype=np.uint8)]
    tags = [np.array([1, 0, 1], np.float32), None]
    plain = spec.cam.replace(layers=())  # the graph gives the CAM; LayerCAM (the config's cam.layers) needs torch
    for a, b in zip(predict_cams(onnx_backend, images, tags, plain),
                    predict_cams(torch_backend, images, tags, plain), strict=True):  # fmt: skip
        assert torch.equal(a.tags, b.tags) and a.cam.shape == (3, *a.seed.shape)
        torch.testing.assert_close(a.cam, b.cam, atol=1e-4, rtol=0)
