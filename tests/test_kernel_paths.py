"""The training and inference paths through the kernel dispatch: Triton (interpreter) and the references agree.

``WSSS_KERNELS=triton`` forces the Triton kernels: on CPU tensors in the Triton interpreter (which ``make test``
switches on), on a GPU compiled when the interpreter is off (the GPU check); ``WSSS_KERNELS=torch`` switches them
off. Same seeds, same losses, same gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_COBRA

from wsss.cam.pipeline import predict_cams
from wsss.kernels import cam_post, infonce, ptc
from wsss.kernels.dispatch import interpreter_enabled, triton_available
from wsss.models import ModelSpec, build_model
from wsss.train.cobra import CoBraObjective
from wsss.train.configs import get_config, model_spec
from wsss.train.seco_losses import ptc_loss

CLASSES = ("background", "a", "b", "c")

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu")
pytestmark = pytest.mark.skipif(
    not (triton_available() and (interpreter_enabled() or DEVICE.type == "cuda")),
    reason="needs triton and TRITON_INTERPRET=1 (make test) or a CUDA device",
)


def _both(monkeypatch, fn):
    """``fn()`` with the kernels forced on, then off; the Triton entry points must have run in the first call."""
    calls = []
    for module, name in ((cam_post, "_triton"), (infonce, "_PatchInfoNCE"), (ptc, "_MaskedPTC")):
        original = getattr(module, name)
        if name == "_triton":
            monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
        else:
            counting = type(name, (original,), {"apply": classmethod(lambda c, *a, _o=original, _n=name: (
                calls.append(_n), _o.apply(*a))[1])})  # fmt: skip
            monkeypatch.setattr(module, name, counting)
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("WSSS_KERNELS", backend)
        torch.manual_seed(0)
        before = len(calls)
        results.append(fn())
        assert (len(calls) > before) == (backend == "triton"), f"the Triton kernels ran: {calls[before:]}"
    return results


def _cobra(seed: int = 0):
    torch.manual_seed(seed)
    cfg = get_config("cobra-tiny-synth", TINY_COBRA)
    return build_model(model_spec(cfg, CLASSES)).to(DEVICE), cfg


@pytest.mark.parametrize("source", ["fuse", "cnn", "avg", None])
def test_inference_seeds_identical_with_kernels_on_and_off(monkeypatch, source):
    model, cfg = _cobra()
    if source is None:  # a single-source network (SeCo/CAM rules): min-max, flip max, fixed threshold
        model = build_model(ModelSpec("cam", {"backbone": cfg["model"]["backbone"]}, CLASSES)).to(DEVICE)
    model.eval()
    rng = np.random.default_rng(0)
    # 28 x 36: no multiple of the patch size 8; native size runs it unpadded (ViT 3 x 4 grid; 0.5 -> 14 x 18).
    # Each image fits one pixel block of the kernel (the interpreter is slow; tests/test_kernels.py has several).
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((28, 36), (32, 32))]
    tags = [np.array([1, 0, 1], np.float32), None]
    for size in (32, None):
        # the spec's own rules: CoBra's attention percentile and sources, or the threshold rule
        settings = model.spec.cam.replace(input_size=size, scales=(1.0, 0.5), bg_percentile=60.0)
        if source is not None:
            settings = settings.replace(source=source)
        on, off = _both(monkeypatch, lambda s=settings: predict_cams(model, images, tags, s, DEVICE))
        for a, b in zip(on, off, strict=True):
            assert np.array_equal(a.seed, b.seed)
            torch.testing.assert_close(a.cam, b.cam, rtol=1e-5, atol=1e-6)


def test_cobra_training_step_identical_with_kernels_on_and_off(monkeypatch):
    model, cfg = _cobra()
    objective = CoBraObjective(model, cfg)
    batch = {"image": torch.randn(2, 3, 48, 48, device=DEVICE),
             "labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=DEVICE)}  # fmt: skip

    def step():
        model.zero_grad(set_to_none=True)
        losses = objective(model, batch, step=10)
        losses["loss"].backward()
        return {k: v.detach() for k, v in losses.items()}, model.cnn_proj.weight.grad, model.vit_proj.weight.grad

    (l_on, gc_on, gs_on), (l_off, gc_off, gs_off) = _both(monkeypatch, step)
    for key in l_off:
        torch.testing.assert_close(l_on[key], l_off[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc_on, gc_off, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gs_on, gs_off, rtol=1e-4, atol=1e-6)


def test_seco_ptc_identical_with_kernels_on_and_off(monkeypatch):
    feats = torch.randn(2, 16, 5, 7, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5, 7), device=DEVICE)
    labels[0, 0, :3] = 255

    def loss_and_grad():
        (grad,) = torch.autograd.grad(value := ptc_loss(feats, labels), feats)
        return value.detach(), grad

    (v_on, g_on), (v_off, g_off) = _both(monkeypatch, loss_and_grad)
    torch.testing.assert_close(v_on, v_off, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_on, g_off, rtol=1e-4, atol=1e-7)
