"""CAM -> label rules: ``cam_to_label`` / ``cam_to_roi_mask`` (§1.4, §1.5) and the image box (§1.6)."""

from __future__ import annotations

import torch

from ..data.palette import IGNORE_INDEX


def cam_to_label(
    cam: torch.Tensor,
    labels: torch.Tensor,
    bkg_thresh: float,
    high_thresh: float | None = None,
    low_thresh: float | None = None,
    img_box: torch.Tensor | None = None,
    ignore_mid: bool = False,
    uncertain: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid CAM ``V = y * M`` and its label map (1.6), always both (quirk Q1.1 fixed).

    ``l = argmax_k V + 1``, ``0`` where ``max_k V <= bkg_thresh``. With ``img_box`` (B, 4) = (top, bottom, left,
    right) and ``ignore_mid``: ``uncertain`` where ``v <= high_thresh``, then ``0`` where ``v <= low_thresh`` (rules
    in this order), then 255 outside the box. Without a box the plain ``bkg_thresh`` label is returned, as the
    code's ``cam_to_label`` and ``cam_to_roi_mask`` do (§1.4, §1.5). ``uncertain=-1`` gives ``cam_to_roi_mask``.
    """
    valid = cam * labels[:, :, None, None].to(cam.dtype)
    value, idx = valid.max(dim=1)
    label = idx + 1
    label[value <= bkg_thresh] = 0
    if img_box is None:
        return valid, label
    if ignore_mid:
        label[value <= high_thresh] = uncertain
        label[value <= low_thresh] = 0
    return valid, label.masked_fill(~box_mask(img_box, label.shape[-2:], label.device), IGNORE_INDEX)


def box_mask(img_box: torch.Tensor, size: tuple[int, int], device=None) -> torch.Tensor:
    """(B, 4) boxes (top, bottom, left, right; half-open) -> (B, H, W) bool masks, without a Python loop."""
    rows = torch.arange(size[0], device=device)[None, :, None]
    cols = torch.arange(size[1], device=device)[None, None, :]
    box = img_box.to(device=device, dtype=torch.long)[:, :, None, None]
    return (rows >= box[:, 0]) & (rows < box[:, 1]) & (cols >= box[:, 2]) & (cols < box[:, 3])
