"""SeCo crop and tag (§3.4): Appendix B oracle, global tags, candidate windows, crops."""

from __future__ import annotations

import torch

from wsss.train.seco_crops import crop_and_tag, crop_windows


def _roi(h=65, w=65):
    return torch.zeros(1, h, w, dtype=torch.long)


def test_fg_mass_counts_class_ids_appendix_b():
    # 64x64 window with 41 pixels of class 20: rho = 20 * 41 / 4096 = 0.2002 > 0.2 -> tag 20; class 1 -> tag 0
    for cls, want in ((20, 20), (1, 0)):
        roi = _roi()
        roi[0, 10, 10:51] = cls
        _, flags = crop_and_tag(roi, 20, n_crops=1, size=64)
        assert flags[0, 2].item() == want


def test_global_tags():
    two = _roi()
    two[0, 5, 5], two[0, 50, 50] = 2, 7
    empty = _roi()
    one = _roi()
    one[0, 20:30, 20:30] = 4
    _, flags = crop_and_tag(torch.cat([two, empty, one]), 20, n_crops=1, size=64)
    assert flags[:, :2].tolist() == [[-1, -1], [1, 1], [4, 4]]  # ambiguous, the empty-image quirk (Q3.3), class


def test_windows_centre_on_uncertain_pixels_and_single_class_lends_its_tag():
    roi = torch.zeros(1, 128, 128, dtype=torch.long)
    roi[0, 50:70, 60:80] = -1
    roi[0, 10:20, 10:20] = 5
    roi[0, :, 120:] = 255
    positions, flags = crop_and_tag(roi, 20, n_crops=6, size=32, generator=torch.Generator().manual_seed(0))
    centres = positions + 16
    assert torch.all(
        (centres[..., 0] >= 50) & (centres[..., 0] < 70) & (centres[..., 1] >= 60) & (centres[..., 1] < 80)
    )
    assert len({tuple(p) for p in positions[0].tolist()}) == 6  # without replacement
    assert flags[0].tolist() == [5] * 8  # uncertain pixels of a single-class image count as that class


def test_two_classes_in_a_window_are_ambiguous_and_few_candidates_fall_back():
    roi = torch.zeros(1, 40, 40, dtype=torch.long)
    roi[0, :, :20] = 2
    roi[0, :, 20:] = 3
    positions, flags = crop_and_tag(roi, 5, n_crops=3, size=32)  # no uncertain pixel: any position
    assert positions.shape == (1, 3, 2) and flags[0, 2:].tolist() == [-1, -1, -1]


def test_crop_windows_cut_the_same_pixels():
    images = torch.randn(2, 3, 50, 60)
    positions = torch.tensor([[[0, 0], [10, 28]], [[18, 5], [3, 3]]])
    crops = crop_windows(images, positions, 32)
    assert crops.shape == (2, 2, 3, 32, 32)
    torch.testing.assert_close(crops[1, 0], images[0, :, 10:42, 28:60])
    torch.testing.assert_close(crops[0, 1], images[1, :, 18:50, 5:37])
