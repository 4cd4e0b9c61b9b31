"""SeCo's "crop and tag" image decomposition (§3.4), batched.

Local windows are centred on uncertain CAM pixels and tagged from the ROI mask: a single class ``k``, background
``0`` (little foreground mass) or ambiguous ``-1``. The official code loops over images and re-seeds the global RNG
so that its two calls pick the same windows; here positions are drawn once and applied to both views.
"""

from __future__ import annotations

import torch

from ..data.palette import IGNORE_INDEX


def crop_and_tag(
    roi: torch.Tensor, num_classes: int, n_crops: int = 10, size: int = 64, thresh: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Window positions (B, n_crops, 2) (top-left row, col) and flags (B, 2 + n_crops) = [g, g, c_1..c_n].

    ``roi`` (B, H, W) holds ``-1`` (uncertain), ``0``, ``1..K`` and 255 (outside the image box), as
    ``cam_to_label(..., uncertain=-1)`` makes it. ``num_classes`` is K; ``generator`` (on ``roi``'s device, or
    None for the global one) draws the positions.
    """
    b, h, w = roi.shape
    margin = size // 2
    r0 = roi.masked_fill(roi == IGNORE_INDEX, 0)  # (3.1)
    r1 = r0.clamp_min(0)
    u = r1 + (r0 == -1).long()  # class id on confident pixels, 1 on uncertain ones (the class-id quirk Q3.2)

    presence = _presence(r1.flatten(1), num_classes)  # (B, K) classes in the image
    n_global = presence.sum(1)
    single = presence.float().argmax(1) + 1
    global_tag = torch.where(n_global >= 2, -1, torch.where(n_global == 1, single, 1))  # 1 when empty (Q3.3)
    # a single-class image lends its class to its uncertain pixels for the local tags
    r1 = r1 + (single * (n_global == 1))[:, None, None] * (r0 == -1)

    positions = _draw_positions(r0, n_crops, size, margin, generator)
    u_win, r1_win = _windows(u, positions, size), _windows(r1, positions, size)  # (B, n, s, s)
    rho = u_win.flatten(2).sum(-1).float() / size**2  # (3.2)
    local_presence = _presence(r1_win.flatten(2), num_classes)  # (B, n, K)
    count = local_presence.sum(-1)
    local = torch.where(count == 1, local_presence.float().argmax(-1) + 1, -1)
    local = torch.where(rho <= thresh, 0, local)
    flags = torch.cat([global_tag[:, None].expand(b, 2), local], dim=1)
    return positions, flags


def crop_windows(images: torch.Tensor, positions: torch.Tensor, size: int = 64) -> torch.Tensor:
    """(B, C, H, W) images -> (n, B, C, size, size) windows at ``positions`` (one tensor per crop index)."""
    b, c = images.shape[:2]
    rows = positions[..., 0, None] + torch.arange(size, device=images.device)  # (B, n, s)
    cols = positions[..., 1, None] + torch.arange(size, device=images.device)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    crops = images.permute(0, 2, 3, 1)[batch, rows[..., :, None], cols[..., None, :]]  # (B, n, s, s, C)
    return crops.permute(1, 0, 4, 2, 3).contiguous()


def _presence(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., P) integer labels -> (..., K) bool: which of classes 1..K occur."""
    onehot = torch.zeros(*labels.shape[:-1], num_classes + 1, dtype=torch.bool, device=labels.device)
    return onehot.scatter_(-1, labels.long().clamp(0, num_classes), True)[..., 1:]


def _draw_positions(r0, n_crops: int, size: int, margin: int, generator) -> torch.Tensor:
    """Uniform choice without replacement among uncertain centres (all positions if fewer than ``n_crops``)."""
    b, h, w = r0.shape
    span_h, span_w = h - 2 * margin, w - 2 * margin
    centres = r0[:, margin : margin + span_h, margin : margin + span_w].flatten(1) == -1  # (B, P)
    enough = centres.sum(1, keepdim=True) >= n_crops
    allowed = torch.where(enough, centres, torch.ones_like(centres))
    scores = torch.rand(centres.shape, generator=generator, device=r0.device).masked_fill(~allowed, -1.0)
    pick = scores.topk(n_crops, dim=1).indices  # (B, n)
    return torch.stack([pick // span_w, pick % span_w], dim=-1)


def _windows(maps: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    return crop_windows(maps[:, None], positions, size)[:, :, 0].transpose(0, 1)
