"""PAR: pixel-adaptive refinement (§2; AFA/ToCo/SeCo), batched on the device.

Each pixel mixes its 48 dilated neighbours (dilations 1, 2, 4, 8, 12, 24; replicate padding; centre excluded)
with weights ``kappa = softmax(a_rgb) + w2 * softmax(a_pos)`` computed once, then propagates ``T`` times. A
propagation step accumulates the 48 weighted shifts in place rather than stacking them (48x less memory;
``tests/test_par.py`` checks it against the stacked form).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .labels import box_mask

DILATIONS = (1, 2, 4, 8, 12, 24)
# 3x3 stencil in row-major order without its centre (§2.2)
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbours(x: torch.Tensor, dilations: tuple[int, ...] = DILATIONS) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 8 * len(dilations), H, W): dilated neighbours with replicate padding."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy, dx in OFFSETS:
            out.append(padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, dim=2)


def position_logits(dilations: tuple[int, ...] = DILATIONS, w1: float = 0.3) -> torch.Tensor:
    """(2.3) ``a_pos(q) = -(dist(q) / ((sigma_pos + 1e-8) * w1))^2`` with ``sigma_pos`` the unbiased std of dist."""
    dist = torch.tensor([d * math.hypot(dy, dx) for d in dilations for dy, dx in OFFSETS], dtype=torch.float64)
    return -((dist / ((dist.std() + 1e-8) * w1)) ** 2)


def par_kernel(image: torch.Tensor, dilations=DILATIONS, w1: float = 0.3, w2: float = 0.01) -> torch.Tensor:
    """(2.1)-(2.4) affinity ``kappa`` (B, 48, H, W) from the image (B, 3, H, W) in [0, 1]; rows sum to 1 + w2."""
    nb = neighbours(image, dilations)  # (B, 3, N, H, W)
    sigma = nb.std(dim=2, keepdim=True)  # unbiased, over the 48 neighbours only (Q2.3)
    diff = (nb - image.unsqueeze(2)).abs() / ((sigma + 1e-8) * w1)
    a_rgb = -(diff**2).mean(dim=1)  # squared before the mean over channels
    return a_rgb.softmax(dim=1) + w2 * _position_weights(tuple(dilations), w1, image.device, image.dtype)


@functools.lru_cache(maxsize=16)
def _position_weights(dilations: tuple[int, ...], w1: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``softmax(a_pos)`` as (1, N, 1, 1) on the device, made once: PAR runs in every SeCo step, and a host-built
    tensor copied to a GPU each call would wait for it."""
    return position_logits(dilations, w1).to(device, dtype).softmax(dim=0).view(1, -1, 1, 1)


def par(image: torch.Tensor, maps: torch.Tensor, iterations: int = 10, dilations=DILATIONS) -> torch.Tensor:
    """(2.5) Refine ``maps`` (B, L, h', w') guided by ``image`` (B, 3, H, W); output at (H, W).

    ``maps`` are first resized bilinearly with ``align_corners=True``; channels are independent.
    """
    kappa = par_kernel(image, dilations)  # (B, 48, H, W)
    m = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=True)
    for _ in range(iterations):
        m = propagate(m, kappa, dilations)
    return m


def propagate(m: torch.Tensor, kappa: torch.Tensor, dilations=DILATIONS) -> torch.Tensor:
    """One step of (2.5), ``m'(p) = sum_q kappa(p, q) m(q)``; equals ``(neighbours(m) * kappa[:, None]).sum(2)``."""
    h, w = m.shape[-2:]
    out = torch.zeros_like(m)
    q = 0
    for d in dilations:
        padded = F.pad(m, (d, d, d, d), mode="replicate")
        for dy, dx in OFFSETS:
            out.addcmul_(padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w], kappa[:, q : q + 1])
            q += 1
    return out


def refine_labels(
    image: torch.Tensor, cams: torch.Tensor, tags: torch.Tensor, bkg_score: float | tuple[float, ...],
    down_scale: int = 2,
) -> torch.Tensor:  # fmt: skip
    """Label maps from PAR-refined CAMs, batched (quirk Q2.1 fixed; one pass of ``refine_cams_with_bkg_v2``).

    ``[bkg_score, cams]`` is restricted to background + each image's tags (absent classes get -inf before the
    softmax, so they take no probability), refined by PAR at ``1/down_scale`` resolution and arg-maxed at full
    resolution. ``image`` (B, 3, H, W) in [0, 1], ``cams`` (B, K, H, W) normalised, ``tags`` (B, K) multi-hot.
    Returns (B, H, W) int64 labels in 0..K; for a tuple of S background scores, (S, B, H, W), one PAR pass.
    """
    scores = (bkg_score,) if isinstance(bkg_score, float | int) else tuple(bkg_score)
    h, w = image.shape[-2:]
    small = (max(1, h // down_scale), max(1, w // down_scale))  # a 1-pixel side stays 1 (never 0)
    img = F.interpolate(image, size=small, mode="bilinear", align_corners=False)
    cams = F.interpolate(cams, size=small, mode="bilinear", align_corners=False)
    keep = torch.cat([torch.ones_like(tags[:, :1]), tags], dim=1).bool()[:, :, None, None]
    probs = [torch.cat([torch.full_like(cams[:, :1], s), cams], 1).masked_fill(~keep, float("-inf")).softmax(1)
             for s in scores]  # fmt: skip
    refined = par(img, torch.cat(probs, dim=1))  # one kappa, every background score's channels at once
    refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
    labels = refined.unflatten(1, (len(scores), -1)).masked_fill(~keep[:, None], float("-inf")).argmax(dim=2)
    return labels.transpose(0, 1) if isinstance(bkg_score, tuple | list) else labels[:, 0]


def refine_with_background(
    image: torch.Tensor, valid_cam: torch.Tensor, tags: torch.Tensor, high: float, low: float,
    img_box: torch.Tensor | None = None, down_scale: int = 2,
) -> torch.Tensor:  # fmt: skip
    """SeCo's ``refine_cams_with_bkg_v2`` (§2.5), batched: PAR with a high and a low background score, then (2.6).

    A class comes from the high-background map; background needs both maps to agree; the rest is 255, as is
    everything outside ``img_box`` (B, 4) = (top, bottom, left, right). Returns (B, H, W) int64.
    """
    hi, lo = refine_labels(image, valid_cam, tags, (high, low), down_scale)
    label = hi.masked_fill(hi == 0, 255).masked_fill((hi + lo) == 0, 0)
    if img_box is not None:
        label = label.masked_fill(~box_mask(img_box, label.shape[-2:], label.device), 255)
    return label
