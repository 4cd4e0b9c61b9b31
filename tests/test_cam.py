"""The CAM path (wsss.cam.pipeline): multi-scale fusion (§1.3, §4.8, §4.9), cam_to_label (§1.4, §1.5), CRF (§5)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.cam.crf import CRF_PRESETS, crf_from_labels, crf_from_probs
from wsss.cam.labels import box_mask, cam_to_label
from wsss.cam.pipeline import (
    forward_pyramid,
    image_pyramid,
    normalized_maps,
    postprocess,
    predict_cams,
    predicted_tags,
    pyramid_sizes,
    stack_maps,
    tensor_pyramid,
)
from wsss.data.transforms import normalize_images
from wsss.kernels import normalize_maps
from wsss.models import CAMSettings


class FixedCAM(nn.Module):
    """A 'network' whose CAM is a fixed function of the input: channel k = x[:, k] average-pooled 4 x 4.

    Any input size runs: the pooling floors, like a ViT's patch embedding (no ``patch_size`` is read any more)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.avg_pool2d(x[:, :2], 4)
        return a.amax(dim=(2, 3)), a


class TwoSourceCAM(nn.Module):
    """CoBra's output layout on two grids: CNN CAMs (B, 2, H/4, W/4) and ViT maps (B, 3, H/8, W/8), whose last
    channel stands for ``A_obj``."""

    def forward(self, x: torch.Tensor):
        cnn, vit = F.avg_pool2d(x[:, :2], 4), F.avg_pool2d(x, 8) * x.new_tensor([1.0, 1.0, 0.05])[:, None, None]
        return cnn.mean((2, 3)), cnn, vit


def up(a: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(a, size, mode="bilinear", align_corners=False)


def _blobs(h: int, w: int, seed: int) -> np.ndarray:
    """A uint8 image of smooth random blobs (a 4 x 5 random grid, upsampled bicubically)."""
    coarse = torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (1, 3, 4, 5)))
    return F.interpolate(coarse, (h, w), mode="bicubic").clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()


def reference_multi_scale(model, x, scales, flip):
    """Direct transcription of (1.3)-(1.5), one scale and one image at a time: ``x_s = Bil(x; floor(sH), floor(sW))``,
    CAMs upsampled to (H, W), flips merged by max, then ReLU, summed, min-max normalised."""
    b, _, h, w = x.shape
    out = []
    for i in range(b):
        total = 0
        for s in [1.0] + [s for s in scales if s != 1.0]:
            xi = x[i : i + 1]
            if s != 1.0:
                xi = up(xi, (int(s * h), int(s * w)))
            a = up(model(xi)[1], (h, w))
            if flip:
                a = torch.maximum(a, up(model(xi.flip(-1))[1], (h, w)).flip(-1))
            total = total + a.relu()
        m = total - total.amin(dim=(2, 3), keepdim=True)
        out.append(m / (m.amax(dim=(2, 3), keepdim=True) + 1e-5))
    return torch.cat(out)


def seco_maps(model, x, settings):
    raw = forward_pyramid(model, tensor_pyramid(x, settings), settings)
    return normalized_maps(stack_maps(raw, tuple(x.shape[-2:]), settings), settings), raw


@pytest.mark.parametrize("flip", [True, False])
def test_multi_scale_cam_matches_reference(flip):
    torch.manual_seed(0)
    # 30 x 46 is no multiple of the pooling stride and 0.75 x 30 = 22.5: the scaled sizes floor (22 x 34, 15 x 23,
    # 45 x 69). The old path rounded them to the patch multiple (24 x 36, ...); the official code floors (§1.3).
    x = torch.randn(3, 3, 30, 46)
    model = FixedCAM()
    settings = CAMSettings(input_size=None, scales=(0.75, 0.5, 1.5), flip=flip)
    got, raw = seco_maps(model, x, settings)
    want = reference_multi_scale(model, x, (0.75, 0.5, 1.5), flip)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw.logits, model(x)[0])
    assert [g[0].shape[-2:] for g in raw.groups] == [(7, 11), (5, 8), (3, 5), (11, 17)]  # the pooling floors
    assert got.shape == (3, 2, 30, 46)
    assert got.min() >= 0 and got.max() < 1
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cams, bkg, label = postprocess(stack_maps(raw, (30, 46), settings), tags, settings)
    torch.testing.assert_close(cams, want, rtol=1e-5, atol=1e-6)
    assert bkg.tolist() == [0.5] * 3
    assert torch.equal(label, cam_to_label(cams, tags, 0.5)[1])


def test_base_scale_always_runs():
    x = torch.randn(1, 3, 16, 16)
    model = FixedCAM()
    without, with_base = CAMSettings(scales=(0.5,)), CAMSettings(scales=(1.0, 0.5))
    assert pyramid_sizes((16, 16), without) == pyramid_sizes((16, 16), with_base) == [(16, 16), (8, 8)]
    torch.testing.assert_close(seco_maps(model, x, without)[0], seco_maps(model, x, with_base)[0])
    # scale 1.0 runs first even when listed later (Q1.5), so the logits are the base scale's
    _, raw = seco_maps(model, x, CAMSettings(scales=(0.5, 1.0)))
    torch.testing.assert_close(raw.logits, model(x)[0])


def test_pyramid_sizes_floor_for_seco():
    # §1.3: floor(s * H). Exact for VOC's 448; 112 x 0.75 = 84 stays 84 (the old path rounded it to 88, the
    # nearest multiple of the patch size 8: a deviation, now fixed)
    seco = CAMSettings(scales=(1.0, 0.75, 1.5))
    assert pyramid_sizes((448, 448), seco) == [(448, 448), (336, 336), (672, 672)]
    assert pyramid_sizes((112, 112), seco) == [(112, 112), (84, 84), (168, 168)]
    assert pyramid_sizes((281, 500), seco.replace(scales=(0.5,))) == [(281, 500), (140, 250)]


def test_normalize_maps_range_per_channel():
    m = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    n = normalize_maps(m, "minmax")  # (1.5)
    torch.testing.assert_close(n[0, 0], torch.tensor([[0.0, 2.0], [4.0, 8.0]]) / (8 + 1e-5))
    assert torch.all(n[0, 1] == 0)
    n = normalize_maps(m, "max")  # (4.17): no min subtraction
    torch.testing.assert_close(n[0, 0], m[0, 0] / (9 + 1e-5))
    torch.testing.assert_close(n[0, 1], torch.full((2, 2), 2 / (2 + 1e-5)))


def test_cobra_rules_match_reference():
    """(4.17)-(4.20) transcribed: ReLU on each grid, flips summed, upsampled, scales summed, max-normalised; fused
    (4.19); background the 60th percentile of the summed A_obj; label argmax over [b, y * M_fuse]."""
    images = [_blobs(27, 37, seed) for seed in range(2)]
    settings = CAMSettings.for_family("cobra", {"scales": (1.0, 0.5, 1.5), "bg_percentile": 60.0})
    model, tags = TwoSourceCAM(), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    inputs = image_pyramid(images, settings)
    assert [tuple(t.shape[-2:]) for t in inputs] == [(27, 37), (14, 18), (40, 56)]  # round half to even
    size = (27, 37)
    sums = [0, 0]
    for xs in inputs:
        _, *groups = model(xs)
        _, *flipped = model(xs.flip(-1))
        for i, (g, gf) in enumerate(zip(groups, flipped, strict=True)):
            sums[i] = sums[i] + (up(g.relu(), size) + up(gf.relu(), size).flip(-1))
    m1 = sums[0] / (sums[0].amax((2, 3), keepdim=True) + 1e-5)
    m2 = sums[1][:, :2] / (sums[1][:, :2].amax((2, 3), keepdim=True) + 1e-5)
    fused = torch.maximum((m1 + m2) / 2, m2)
    b = torch.from_numpy(np.percentile(sums[1][:, 2].flatten(1).numpy(), 60.0, axis=1)).float()
    value, idx = (tags[:, :, None, None] * fused).max(1)
    want_label = torch.where(value <= b[:, None, None], 0, idx + 1)

    raw = forward_pyramid(model, inputs, settings)
    cams, bkg, label = postprocess(stack_maps(raw, size, settings), tags, settings)
    torch.testing.assert_close(cams, fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bkg, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(label, want_label)
    assert 0 < (label == 0).float().mean() < 1
    for source, want in (("cnn", m1), ("vit", m2), ("avg", (m1 + m2) / 2), ("max", torch.maximum(m1, m2))):
        got, _, _ = postprocess(stack_maps(raw, size, settings), tags, settings.replace(source=source))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cam_to_label_appendix_b_oracle():
    # v in {0.2, 0.25, 0.26, 0.7, 0.71} with VOC thresholds -> 0, 0, 255, 255, class (METHODS App. B)
    v = torch.tensor([0.2, 0.25, 0.26, 0.7, 0.71])
    cam = torch.zeros(1, 3, 1, 5)
    cam[0, 2, 0] = v
    y = torch.tensor([[0.0, 0.0, 1.0]])
    box = torch.tensor([[0, 1, 0, 5]])
    _, label = cam_to_label(cam, y, 0.5, 0.7, 0.25, img_box=box, ignore_mid=True)
    assert label[0, 0].tolist() == [0, 0, 255, 255, 3]
    _, roi = cam_to_label(cam, y, 0.5, 0.7, 0.25, img_box=box, ignore_mid=True, uncertain=-1)
    assert roi[0, 0].tolist() == [0, 0, -1, -1, 3]


def test_cam_to_label_masks_absent_classes_and_box():
    cam = torch.zeros(1, 2, 2, 3)
    cam[0, 0] = 0.9  # strong but absent class
    cam[0, 1, :, :2] = 0.6
    valid, label = cam_to_label(cam, torch.tensor([[0.0, 1.0]]), bkg_thresh=0.5)
    assert torch.all(valid[0, 0] == 0)
    assert label[0].tolist() == [[2, 2, 0], [2, 2, 0]]
    _, boxed = cam_to_label(cam, torch.tensor([[0.0, 1.0]]), 0.5, img_box=torch.tensor([[0, 1, 1, 3]]))
    assert boxed[0].tolist() == [[255, 2, 0], [255, 255, 255]]


def test_cam_to_label_rule_order_when_bkg_above_high():
    # tau_bkg > tau_hi: pixels with tau_hi < v <= tau_bkg end up 0 (the bkg rule runs first, §1.4)
    cam = torch.full((1, 1, 1, 1), 0.6)
    _, label = cam_to_label(cam, torch.ones(1, 1), 0.65, 0.55, 0.25, img_box=torch.tensor([[0, 1, 0, 1]]),
                            ignore_mid=True)  # fmt: skip
    assert label.item() == 0


def test_cam_to_label_without_box_is_the_plain_label():
    # §1.4/§1.5: without img_box the code returns the plain tau_bkg label even with ignore_mid (the old path applied
    # the uncertain band anyway: a deviation, now fixed; tests/test_deviations.py has the -1 case)
    cam = torch.tensor([0.2, 0.3, 0.6, 0.8]).view(1, 1, 1, 4)
    _, label = cam_to_label(cam, torch.ones(1, 1), 0.5, 0.7, 0.25, ignore_mid=True)
    assert label[0, 0].tolist() == [0, 0, 1, 1]


def test_box_mask_vectorised():
    m = box_mask(torch.tensor([[1, 3, 0, 2], [0, 1, 1, 4]]), (3, 4))
    assert m[0].int().tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert m[1].int().tolist() == [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_predicted_tags_keep_top_class():
    logits = torch.tensor([[-3.0, -1.0, -2.0], [2.0, -1.0, 0.5]])
    assert predicted_tags(logits, 0.5).tolist() == [[0, 1, 0], [1, 0, 1]]


def test_predict_cams_returns_image_resolution_seeds():
    images = [np.zeros((20, 30, 3), np.uint8), np.full((17, 9, 3), 200, np.uint8)]
    images[0][:, :15] = 255
    res = predict_cams(FixedCAM(), images, [np.array([1.0, 0.0]), None], CAMSettings(input_size=16, scales=(1.0,)))
    assert [r.seed.shape for r in res] == [(20, 30), (17, 9)]
    assert res[0].cam.shape == (2, 20, 30)
    assert set(np.unique(res[0].seed)) <= {0, 1}
    assert res[0].seed[:, :10].mean() > 0.9 and res[0].seed[:, 20:].max() == 0  # red-ish left half is class 1
    assert res[0].tags.tolist() == [1.0, 0.0] and res[1].tags.sum() >= 1  # given, then the classifier's own


def _two_region_image(h=40, w=60):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (220, 30, 30)
    img[:, w // 2 :] = (30, 30, 220)
    return img


def test_crf_from_labels_snaps_to_colour_edge():
    img = _two_region_image()
    seed = np.zeros((40, 60), np.uint8)
    seed[:, :22] = 4  # seed stops 8 px short of the colour edge at x = 30
    seed[:, 22:30] = 255  # uncertain
    out = crf_from_labels(img, seed, np.array([0, 4]), CRF_PRESETS["seed"])
    assert out.dtype == np.uint8
    assert (out[:, :30] == 4).mean() > 0.95 and (out[:, 30:] == 0).mean() > 0.95


def test_crf_single_key_and_probs():
    img = _two_region_image()
    assert np.all(crf_from_labels(img, np.zeros((40, 60), np.uint8), np.array([0]), CRF_PRESETS["seed"]) == 0)
    probs = np.full((2, 40, 60), 0.5, np.float32)
    probs[1, :, :25] = 0.9
    probs[0, :, :25] = 0.1
    out = crf_from_probs(img, probs)
    assert out.shape == (40, 60) and (out[:, :20] == 1).all()


def test_native_resolution_runs_each_image_at_its_own_size():
    # The old path zero-padded native-size images to the patch grid (20 x 24 here), ran them together and cropped
    # the fused sum; the official code runs every image at its own size, where the token grid floors (a deviation,
    # now fixed). Images of one exact shape still share a pass.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, s, dtype=np.uint8) for s in ((18, 21, 3), (20, 24, 3), (18, 21, 3))]
    settings = CAMSettings(input_size=None, scales=(1.0, 0.5), flip=True)
    res = predict_cams(FixedCAM(), images, [np.array([1.0, 1.0])] * 3, settings)
    assert [r.cam.shape for r in res] == [(2, 18, 21), (2, 20, 24), (2, 18, 21)]
    for img, r in zip(images, res, strict=True):
        want, _ = seco_maps(FixedCAM(), normalize_images(img)[None], settings)
        torch.testing.assert_close(r.cam, want[0])
        assert r.cam.amax(dim=(1, 2)).min() > 0.99  # each image is normalised over its own pixels only
        _, seed = cam_to_label(want, torch.ones(1, 2), settings.bkg_thresh)
        assert np.array_equal(r.seed, seed[0].numpy())
    with pytest.raises(ValueError, match="different sizes"):
        image_pyramid(images[:2], settings)


def test_without_pydensecrf_only_the_crf_fails_with_its_install_hint():
    # a fresh interpreter in which pydensecrf cannot be imported: the labeler still imports, the CRF says why
    code = (
        "import sys; sys.modules['pydensecrf'] = None\n"
        "import numpy as np, wsss.runtime.labeler, wsss.cam.irn\n"
        "from wsss.cam.crf import refine_seed_crf\n"
        "try:\n"
        "    refine_seed_crf(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), np.array([1.0]))\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install pydensecrf2" in out and "--refine par" in out
