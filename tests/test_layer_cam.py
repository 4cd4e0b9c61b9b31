"""LayerCAM on the VGG trunk (``cam.layers``): its maps against a per-class loop, the one CAM path, the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam.pipeline import predict_cams
from wsss.models import build_model, save_model
from wsss.models.spec import CAMSettings
from wsss.runtime.backends import TorchBackend, open_backend
from wsss.runtime.labeler import LabelConfig, check_source
from wsss.train.configs import get_config, model_spec

CLASSES = ("background", "a", "b", "c")


def vgg_cam():
    torch.manual_seed(0)
    model = build_model(model_spec(get_config("cam-vgg-synth"), CLASSES)).eval()
    for m in model.modules():  # BatchNorm statistics away from the identity, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model


def reference_layer_cams(model, x, stages):
    """The definition, one class at a time: M_k = ReLU(sum_c ReLU(dz_k/da_c) a_c), max-normalised, averaged."""
    x = x.clone().requires_grad_(True)
    feats, acts = model.backbone.forward_stages(x, stages)
    cams = model.classifier(feats)
    logits = model.pool(feats, cams)
    per_map = [[cams[:, k].relu() for k in range(logits.shape[1])]]
    for a in acts:
        maps = []
        for k in range(logits.shape[1]):
            (g,) = torch.autograd.grad(logits[:, k].sum(), a, retain_graph=True)
            maps.append((g.relu() * a).sum(1).relu())
        per_map.append(maps)
    size = acts[0].shape[-2:] if acts else cams.shape[-2:]
    out = 0
    for maps in per_map:
        m = torch.stack(maps, 1)
        m = m / m.amax((2, 3), keepdim=True).clamp_min(1e-5)
        out = out + F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return logits.detach(), (out / len(per_map)).detach()


@pytest.mark.parametrize("stages", [(1, 2), (2,), ()])
def test_layer_cams_match_the_per_class_definition(stages):
    model = vgg_cam()
    x = torch.randn(3, 3, 61, 74)
    logits, fused = model.layer_cams(x, stages)
    ref_logits, ref = reference_layer_cams(model, x, stages)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    assert fused.shape == (3, 3, *((61 // 2, 74 // 2) if stages == (1, 2) else (61 // 4, 74 // 4) if stages else
                                   (61 // 8, 74 // 8)))  # fmt: skip
    assert not any(p.grad is not None for p in model.parameters())  # no gradient left on the weights


def test_layer_cam_seeds_go_through_the_one_cam_path_on_the_torch_backend_only(tmp_path):
    from wsss.export.run import run_export

    model = vgg_cam()
    backend = TorchBackend(model)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (61, 93, 3), dtype=np.uint8) for _ in range(2)]
    tags = [np.array([1, 0, 1], np.float32), None]
    plain = model.spec.cam.replace(input_size=None, scales=(1.0,), layers=())
    layered = plain.replace(layers=(1, 2))
    a, b = predict_cams(backend, images, tags, plain), predict_cams(backend, images, tags, layered)
    assert all(torch.equal(x.tags, y.tags) for x, y in zip(a, b, strict=True))
    assert not torch.allclose(a[0].cam, b[0].cam) and b[0].cam.shape == a[0].cam.shape
    check_source(backend, LabelConfig(layered))
    ckpt = save_model(tmp_path / "vgg.safetensors", model, model.spec, step=1)
    onnx_path = tmp_path / "vgg.onnx"
    run_export(ckpt, onnx_path=onnx_path, echo=lambda _: None)
    onnx_backend, _, _ = open_backend(engine=onnx_path)
    with pytest.raises(ValueError, match="LayerCAM.*onnx backend.*torch backend"):
        check_source(onnx_backend, LabelConfig(layered))
    with pytest.raises(ValueError, match="LayerCAM.*needs the network's gradients"):
        predict_cams(onnx_backend, images, tags, layered)
    check_source(onnx_backend, LabelConfig(plain))


def test_layer_cam_settings_are_checked():
    assert CAMSettings(layers=[1, 2]).layers == (1, 2)  # from a JSON list
    assert CAMSettings(layers=(1, 2)).override(layers=()).layers == ()
    with pytest.raises(ValueError, match="stage indices"):
        CAMSettings(layers=(-1,))
    model = vgg_cam()
    with pytest.raises(ValueError, match="stages 0..3"):
        model.layer_cams(torch.randn(1, 3, 32, 32), (4,))
    vit = build_model(model_spec(get_config("cam-tiny-synth"), CLASSES))
    with pytest.raises(ValueError, match="VGG trunk"):
        vit.layer_cams(torch.randn(1, 3, 32, 32), (1,))
