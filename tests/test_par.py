"""PAR (§2) against the Appendix B oracles and a per-pixel transcription."""

from __future__ import annotations

import math

import numpy as np
import torch

from wsss.cam.par import DILATIONS, OFFSETS, neighbours, par, par_kernel, position_logits, propagate, refine_labels


def test_position_term_oracles():
    dist = torch.tensor([d * math.hypot(dy, dx) for d in DILATIONS for dy, dx in OFFSETS], dtype=torch.float64)
    assert abs(dist.std().item() - 9.90030) < 1e-5
    weights = position_logits().softmax(0)
    assert abs(weights[0].item() - 0.0683) < 1e-4 and abs(weights[1].item() - 0.0765) < 1e-4  # diagonal, axial
    mass = weights.view(6, 8).sum(1)
    torch.testing.assert_close(mass[:4], torch.tensor([0.5789, 0.3560, 0.0649, 0.0002], dtype=torch.float64),
                               atol=1e-4, rtol=0)  # fmt: skip


def test_kernel_rows_sum_to_1_01():
    kappa = par_kernel(torch.rand(2, 3, 9, 11))
    torch.testing.assert_close(kappa.sum(1), torch.full((2, 9, 11), 1.01))


def reference_kernel(img: torch.Tensor, p: tuple[int, int]) -> torch.Tensor:
    """One pixel of (2.1)-(2.4), written out with explicit clamped coordinates."""
    _, h, w = img.shape
    y, x = p
    values, dists = [], []
    for d in DILATIONS:
        for dy, dx in OFFSETS:
            qy, qx = min(max(y + dy * d, 0), h - 1), min(max(x + dx * d, 0), w - 1)
            values.append(img[:, qy, qx])
            dists.append(d * math.hypot(dy, dx))
    nb = torch.stack(values, 1)  # (3, 48)
    sigma = nb.std(1, keepdim=True)
    a_rgb = -(((nb - img[:, y, x, None]).abs() / ((sigma + 1e-8) * 0.3)) ** 2).mean(0)
    dist = torch.tensor(dists, dtype=img.dtype)
    a_pos = -((dist / ((dist.std() + 1e-8) * 0.3)) ** 2)
    return a_rgb.softmax(0) + 0.01 * a_pos.softmax(0)


def test_kernel_matches_per_pixel_transcription():
    torch.manual_seed(0)
    img = torch.rand(1, 3, 7, 30, dtype=torch.float64)
    kappa = par_kernel(img)
    for p in [(0, 0), (3, 14), (6, 29), (2, 25)]:
        torch.testing.assert_close(kappa[0, :, p[0], p[1]], reference_kernel(img[0], p))


def test_par_smooths_within_colour_regions():
    img = torch.zeros(1, 3, 16, 16)
    img[..., 8:] = 1.0  # two flat halves
    maps = torch.zeros(1, 1, 16, 16)
    maps[..., :8] = 1.0
    maps[..., 2, 2] = 0.0  # a hole inside the left region is filled from its neighbours
    out = par(img, maps, iterations=10)
    assert out[0, 0, 2, 2] > 0.9 and out[0, 0, :, 12:].max() < 0.05


def test_propagate_equals_the_stacked_neighbour_sum():
    torch.manual_seed(0)
    img, m = torch.rand(2, 3, 20, 31, dtype=torch.float64), torch.rand(2, 4, 20, 31, dtype=torch.float64)
    kappa = par_kernel(img)
    torch.testing.assert_close(propagate(m, kappa), (neighbours(m) * kappa[:, None]).sum(2))


def test_refine_labels_with_several_background_scores_equals_separate_calls():
    torch.manual_seed(1)
    img, cams = torch.rand(3, 3, 24, 20), torch.rand(3, 4, 24, 20)
    tags = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    both = refine_labels(img, cams, tags, (0.7, 0.25))
    assert both.shape == (2, 3, 24, 20)
    torch.testing.assert_close(both[0], refine_labels(img, cams, tags, 0.7))
    torch.testing.assert_close(both[1], refine_labels(img, cams, tags, 0.25))


def test_refine_labels_restricts_to_tags():
    img = torch.rand(2, 3, 16, 16)
    cams = torch.rand(2, 3, 16, 16)
    tags = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = refine_labels(img, cams, tags, bkg_score=0.5)
    assert set(labels[0].unique().tolist()) <= {0, 1} and set(labels[1].unique().tolist()) <= {0, 3}


def test_refine_with_background_rule_2_6_and_box():
    from wsss.cam.par import refine_with_background

    img = torch.zeros(1, 3, 16, 16)
    img[..., 8:] = 1.0
    cam = torch.zeros(1, 2, 16, 16)
    cam[0, 0, :, 8:] = 0.9  # class 1 strong on the right half
    cam[0, 1, :, :8] = 0.5  # class 2 between the two background scores on the left half
    label = refine_with_background(img, cam, torch.ones(1, 2), high=0.7, low=0.25,
                                   img_box=torch.tensor([[0, 16, 0, 14]]))  # fmt: skip
    assert (label[0, :, 9:14] == 1).all()  # above both background scores: class 1
    assert (label[0, 2:14, 1:6] == 255).all()  # background by the high map, class 2 by the low one: uncertain
    assert (label[0, :, 14:] == 255).all()  # outside the box
    zero = refine_with_background(img, torch.zeros(1, 2, 16, 16), torch.ones(1, 2), 0.7, 0.25)
    assert (zero == 0).all()  # both maps say background


def test_refine_with_background_without_box_is_the_whole_image_box():
    # §2.5: the code needs a box; a box-free call behaves as if the box were [0, H, 0, W]
    from wsss.cam.par import refine_with_background

    torch.manual_seed(2)
    img, cam = torch.rand(2, 3, 16, 12), torch.rand(2, 3, 16, 12)
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    whole = torch.tensor([[0, 16, 0, 12]] * 2)
    assert torch.equal(refine_with_background(img, cam, tags, 0.7, 0.25),
                       refine_with_background(img, cam, tags, 0.7, 0.25, img_box=whole))  # fmt: skip


def test_par_input_is_a_uint8_image():
    # §2.1: PAR sees the denormalised image cast to uint8 (truncated), divided by 255; tests/test_deviations.py
    # checks every level against the official expression
    from wsss.data.transforms import normalize_images, to_uint8_levels

    img = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    levels = to_uint8_levels(normalize_images(img)[None])
    assert levels.shape == (1, 3, 9, 11) and levels.dtype == torch.float32
    assert torch.equal(levels, levels.round()) and levels.min() >= 0 and levels.max() <= 255
    assert (levels[0] - torch.from_numpy(img).permute(2, 0, 1).float()).abs().max() <= 1  # truncation: one level
