"""The labeling path keeps its work on the device, checked on the ``meta`` device (shapes without data, no GPU needed):
``predict_cams(on_device=True)`` leaves every result there, a pass sends its images and tags in one copy each, the
host results equal the device ones, and the labeler's batched PAR equals PAR image by image."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from wsss.cam.par import refine_labels
from wsss.cam.pipeline import CAMResult, predict_cams, to_device, to_host
from wsss.models import CAMSettings
from wsss.runtime.labeler import _refine_par


class FixedCAM(torch.nn.Module):
    """CAMs = the first two channels average-pooled 4 x 4; logits = their maxima."""

    def forward(self, x):
        a = F.avg_pool2d(x[:, :2], 4)
        return a.amax(dim=(2, 3)), a


class TwoSourceCAM(torch.nn.Module):
    """CoBra's layout: CNN CAMs (B, 2, H/4, W/4) and ViT maps (B, 3, H/8, W/8), the last channel ``A_obj``."""

    def forward(self, x):
        cnn, vit = F.avg_pool2d(x[:, :2], 4), F.avg_pool2d(x, 8)
        return cnn.mean((2, 3)), cnn, vit


class HostToDevice(TorchDispatchMode):
    """Records every copy from the CPU to another device."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[1] if func is torch.ops.aten.copy_.default else args[0]
        copying = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        if copying and source.device.type == "cpu" and out.device.type != "cpu":
            self.copies.append(tuple(source.shape))
        return out


SETTINGS = {
    "fixed size": (FixedCAM(), CAMSettings(input_size=16, scales=(1.0, 0.5))),
    "native size": (TwoSourceCAM(), CAMSettings.for_family("cobra", {"scales": [1.0, 1.5]})),
}
RNG = np.random.default_rng(0)
IMAGES = [RNG.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(20, 24), (17, 30), (20, 24)]]
TAGS = [np.array([1.0, 0.0]), None, np.array([1.0, 1.0])]


@pytest.mark.parametrize("case", SETTINGS)
def test_predict_cams_keeps_results_on_the_device_and_uploads_once_per_pass(case):
    net, settings = SETTINGS[case]
    with HostToDevice() as spy:
        results = predict_cams(net, IMAGES, TAGS, settings, "meta", on_device=True)
    passes = 1 if settings.input_size else len({img.shape for img in IMAGES})
    assert len(spy.copies) == 2 * passes  # per pass: every image (all scales) in one copy, the given tags in one
    for res, img in zip(results, IMAGES, strict=True):
        assert {t.device.type for t in (res.cam, res.tags, res.seed)} == {"meta"}
        assert res.seed.dtype == torch.uint8 and tuple(res.seed.shape) == img.shape[:2]
        assert tuple(res.cam.shape) == (2, *img.shape[:2])


@pytest.mark.parametrize("case", SETTINGS)
def test_host_results_are_the_device_results_brought_back(case):
    net, settings = SETTINGS[case]
    device, host = predict_cams(net, IMAGES, TAGS, settings, on_device=True), predict_cams(net, IMAGES, TAGS, settings)
    for d, h in zip(device, host, strict=True):
        assert isinstance(h.seed, np.ndarray) and h.seed.dtype == np.uint8
        assert np.array_equal(d.seed.numpy(), h.seed) and torch.equal(d.cam, h.cam) and torch.equal(d.tags, h.tags)
    assert host[0].tags.tolist() == [1.0, 0.0] and host[2].tags.tolist() == [1.0, 1.0]  # given tags win


def test_one_copy_each_way_round_trips_mixed_shapes_and_dtypes():
    arrays = [np.arange(6, dtype=np.uint8).reshape(2, 3), np.ones((4,), np.uint8), np.zeros((1, 1, 2), np.uint8)]
    with HostToDevice() as spy:
        on_meta = to_device(arrays, "meta")
    assert len(spy.copies) == 1 and [tuple(t.shape) for t in on_meta] == [(2, 3), (4,), (1, 1, 2)]
    back = to_host([torch.from_numpy(a) for a in arrays] + [torch.full((2, 2), 0.5, dtype=torch.float16)])
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=False))
    assert back[-1].dtype == np.float16 and back[-1].shape == (2, 2)


def test_batched_par_equals_par_image_by_image():
    torch.manual_seed(0)
    shapes = [(20, 24), (17, 30), (20, 24), (20, 24)]
    samples = [SimpleNamespace(image=RNG.integers(0, 255, (*s, 3), dtype=np.uint8)) for s in shapes]
    results = [CAMResult(torch.rand(3, *s), torch.tensor([1.0, 0.0, 1.0]), None) for s in shapes]
    got = _refine_par(samples, results, CAMSettings(bkg_thresh=0.4), "cpu")
    for sample, res, label in zip(samples, results, got, strict=True):
        image = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float() / 255
        want = refine_labels(image, res.cam[None], res.tags[None], 0.4)[0]
        assert label.dtype == torch.uint8 and torch.equal(label, want.to(torch.uint8))
