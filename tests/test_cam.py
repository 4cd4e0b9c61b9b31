"""CAM machinery: multi-scale fusion (METHODS 1.3), cam_to_label rules (1.4/1.5), dense CRF (5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.cam.crf import CRF_PRESETS, crf_from_labels, crf_from_probs
from wsss.cam.infer import CAMSettings, predict_cams, predicted_tags
from wsss.cam.multiscale import box_mask, cam_to_label, multi_scale_cam, normalize_cam, scaled_size


class FixedCAM(nn.Module):
    """A 'network' whose CAM is a fixed function of the input: channel k = x[:, k] pooled by the patch size."""

    patch_size = 4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.avg_pool2d(x[:, :2], self.patch_size)
        return a.amax(dim=(2, 3)), a


def reference_multi_scale(model, x, scales, flip):
    """Direct transcription of (1.3)-(1.5), one scale and one image at a time."""
    b, _, h, w = x.shape
    out = []
    for i in range(b):
        total = 0
        for s in [1.0] + [s for s in scales if s != 1.0]:
            xi = x[i : i + 1]
            if s != 1.0:
                xi = F.interpolate(xi, scaled_size((h, w), s, 4), mode="bilinear", align_corners=False)
            a = F.interpolate(model(xi)[1], (h, w), mode="bilinear", align_corners=False)
            if flip:
                af = F.interpolate(model(xi.flip(-1))[1], (h, w), mode="bilinear", align_corners=False).flip(-1)
                a = torch.maximum(a, af)
            total = total + a.relu()
        m = total - total.amin(dim=(2, 3), keepdim=True)
        out.append(m / (m.amax(dim=(2, 3), keepdim=True) + 1e-5))
    return torch.cat(out)


@pytest.mark.parametrize("flip", [True, False])
def test_multi_scale_cam_matches_reference(flip):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 48)
    model = FixedCAM()
    got, logits = multi_scale_cam(model, x, scales=(0.5, 1.5), flip=flip)
    want = reference_multi_scale(model, x, (0.5, 1.5), flip)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, model(x)[0])
    assert got.shape == (3, 2, 32, 48)
    assert got.min() >= 0 and got.max() < 1


def test_base_scale_always_runs():
    x = torch.randn(1, 3, 16, 16)
    model = FixedCAM()
    torch.testing.assert_close(multi_scale_cam(model, x, scales=(0.5,))[0], multi_scale_cam(model, x, (1.0, 0.5))[0])


def test_scaled_size_is_patch_multiple_and_exact_for_voc():
    assert scaled_size((448, 448), 0.75, 16) == (336, 336)
    assert scaled_size((448, 448), 1.5, 16) == (672, 672)
    assert scaled_size((112, 112), 0.75, 8) == (88, 88)  # floor(84) rounded to the nearest multiple of 8


def test_normalize_cam_range_per_channel():
    m = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    n = normalize_cam(m)
    torch.testing.assert_close(n[0, 0], torch.tensor([[0.0, 2.0], [4.0, 8.0]]) / (8 + 1e-5))
    assert torch.all(n[0, 1] == 0)


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
    # tau_bkg > tau_hi: pixels with tau_hi < v <= tau_bkg end up 0 (the bkg rule runs first, Q in 1.4)
    cam = torch.full((1, 1, 1, 1), 0.6)
    _, label = cam_to_label(cam, torch.ones(1, 1), 0.65, 0.55, 0.25, img_box=torch.tensor([[0, 1, 0, 1]]),
                            ignore_mid=True)  # fmt: skip
    assert label.item() == 0


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


def test_native_resolution_crops_before_normalising():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (18, 21, 3), dtype=np.uint8), rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)]
    settings = CAMSettings(input_size=None, scales=(1.0, 0.5), flip=True)
    res = predict_cams(FixedCAM(), images, [np.array([1.0, 1.0])] * 2, settings)
    assert [r.cam.shape for r in res] == [(2, 18, 21), (2, 20, 24)]
    # both images pad to 20 x 24 and share one pass; the first equals its own padded, cropped computation
    from wsss.cam.infer import preprocess

    x = torch.zeros(1, 3, 20, 24)
    x[0, :, :18, :21] = preprocess([images[0]], None, "cpu")[0]
    fused, _ = multi_scale_cam(FixedCAM(), x, (1.0, 0.5), True, normalize=False)
    torch.testing.assert_close(res[0].cam, normalize_cam(fused[0, :, :18, :21]))
    assert res[0].cam.amax(dim=(1, 2)).min() > 0.99  # the maximum is inside the valid box
