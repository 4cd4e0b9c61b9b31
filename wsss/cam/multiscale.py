"""Multi-scale + flip CAMs (METHODS 1.3) and CAM -> label rules (1.4, 1.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.palette import IGNORE_INDEX

NORM_EPS = 1e-5


def scaled_size(size: tuple[int, int], scale: float, multiple: int) -> tuple[int, int]:
    """``floor(s * H)`` rounded half-up to a multiple of the patch size (exact for VOC's 448 x 0.5/0.75/1.5)."""
    return tuple(max(multiple, (int(scale * n) + multiple // 2) // multiple * multiple) for n in size)


@torch.no_grad()
def multi_scale_cam(
    model: nn.Module,
    x: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    flip_merge: str = "max",
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused, min-max normalised CAMs ``M`` (B, K, H, W) and base-scale image logits (B, K).

    (1.4) ``M = sum_s ReLU(max(A_s, flip(A_s')))`` with every ``A_s`` upsampled to (H, W);
    (1.5) per (b, k): ``M <- (M - min M) / (max(M - min M) + 1e-5)``. Scale 1.0 always runs first (quirk Q1.5).
    ``flip_merge="sum"`` gives CoBra's ``ReLU(A_s) + flip(ReLU(A_s'))`` (4.17). ``model(x)`` must return
    ``(logits, cams)``. ``normalize=False`` returns the fused sum (for cropping first).
    """
    if flip_merge not in ("max", "sum"):
        raise ValueError(f"flip_merge must be 'max' or 'sum', got {flip_merge!r}")
    b, _, h, w = x.shape
    patch = getattr(model, "patch_size", 1)
    fused, logits = None, None
    for s in [1.0, *[s for s in scales if s != 1.0]]:
        xs = x if s == 1.0 else F.interpolate(x, scaled_size((h, w), s, patch), mode="bilinear", align_corners=False)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        z, a = model(xs)
        a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)
        a = a.relu()
        if flip:
            a = torch.maximum(a[:b], a[b:].flip(-1)) if flip_merge == "max" else a[:b] + a[b:].flip(-1)
        if logits is None:
            logits = z[:b]
        fused = a if fused is None else fused + a
    return (normalize_cam(fused) if normalize else fused), logits


@torch.no_grad()
def multi_scale_stack(
    model: nn.Module, x: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw per-scale CAMs ``A_s`` resized to (H, W), flipped halves aligned: (S, F, B, C, H, W), and the
    base-scale logits (B, K). The input of ``wsss.kernels.cam_postprocess``; scale 1.0 first (quirk Q1.5)."""
    b, _, h, w = x.shape
    patch = getattr(model, "patch_size", 1)
    maps, logits = [], None
    for s in [1.0, *[s for s in scales if s != 1.0]]:
        xs = x if s == 1.0 else F.interpolate(x, scaled_size((h, w), s, patch), mode="bilinear", align_corners=False)
        z, a = model(torch.cat([xs, xs.flip(-1)]) if flip else xs)
        a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)
        maps.append(torch.stack([a[:b], a[b:].flip(-1)]) if flip else a[None])
        logits = z[:b] if logits is None else logits
    return torch.stack(maps), logits


def normalize_cam(m: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max normalisation to [0, 1) over the spatial axes (1.5)."""
    m = m - m.amin(dim=(-2, -1), keepdim=True)
    return m / (m.amax(dim=(-2, -1), keepdim=True) + NORM_EPS)


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

    ``l = argmax_k V + 1``, ``0`` where ``max_k V <= bkg_thresh``. With ``ignore_mid``: ``uncertain`` where
    ``v <= high_thresh`` then ``0`` where ``v <= low_thresh`` (rules in this order). Outside ``img_box``
    (B, 4) = (top, bottom, left, right): 255. ``uncertain=-1`` gives ``cam_to_roi_mask`` (1.5).
    """
    valid = cam * labels[:, :, None, None].to(cam.dtype)
    value, idx = valid.max(dim=1)
    label = idx + 1
    label[value <= bkg_thresh] = 0
    if ignore_mid:
        label[value <= high_thresh] = uncertain
        label[value <= low_thresh] = 0
    if img_box is not None:
        label = label.masked_fill(~box_mask(img_box, label.shape[-2:], label.device), IGNORE_INDEX)
    return valid, label


def box_mask(img_box: torch.Tensor, size: tuple[int, int], device=None) -> torch.Tensor:
    """(B, 4) boxes (top, bottom, left, right; half-open) -> (B, H, W) bool masks, without a Python loop."""
    rows = torch.arange(size[0], device=device)[None, :, None]
    cols = torch.arange(size[1], device=device)[None, None, :]
    box = img_box.to(device=device, dtype=torch.long)[:, :, None, None]
    return (rows >= box[:, 0]) & (rows < box[:, 1]) & (cols >= box[:, 2]) & (cols < box[:, 3])
