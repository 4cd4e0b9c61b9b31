"""SeCo's objectives (§3.8-§3.11), vectorised: no Python loops over rows, no host round trips.

Symbols follow METHODS: anchors ``q_i`` with tags ``f_i``, keys ``k_j`` with tags ``g_j``, prototypes ``p_k``,
tag ``k >= 1`` = single class k, ``0`` = background, ``-1`` = ambiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.palette import IGNORE_INDEX
from ..kernels import masked_ptc
from .precision import float32


@float32
def lil_loss(
    q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, g: torch.Tensor, tau: float = 0.08, tau_base: float = 0.08,
    impl: str = "code",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """LIL, local-to-local tag-guided contrast against the key bank (3.5)-(3.14).

    Args:
        q: (N, D) unit anchors ``Q_s``; k: (M, D) unit keys ``cat(K_new, queue)`` (key ``i`` is anchor ``i``'s own).
        f: (N,) anchor tags; g: (M,) key tags.
        impl: "code" reproduces the official loss exactly (3.13); "supcon" is the SupCon form (3.14).

    Returns:
        (loss, revised tags f' (the noisy-anchor filter (3.8) rewrites tags to 0), filtered-row mask).
    """
    n_keys = k.shape[0]
    logits = q @ k.t() / tau  # (3.5) a_ij
    l = logits - logits.amax(dim=1, keepdim=True).detach()  # l_ij <= 0, row max exactly 0
    anchor = f != -1
    l = l * anchor[:, None]  # (3.6) rows tagged -1 are zeroed
    p = l * ((f[:, None] == g[None, :]) & anchor[:, None])  # (3.7) p_ij = l_ij m_ij
    mean = p.mean(dim=1, keepdim=True)  # (3.8) noisy-anchor filter, over all N+Q entries
    n_pos, n_neg = (p >= mean).sum(1), (p < mean).sum(1)
    noisy = n_neg > 10 * (n_pos + 1e-6)
    f_revised = torch.where(noisy, torch.zeros_like(f), f)
    p = p * ~noisy[:, None]
    if impl == "supcon":
        return _supcon(logits, f_revised, g, noisy, tau, tau_base), f_revised, noisy
    if impl != "code":
        raise ValueError(f"impl must be 'code' or 'supcon', got {impl!r}")
    l = l * (g != -1)[None, :]  # (3.9)
    e = l.exp()
    e = e * (e != 1)  # (3.10) drops zeroed entries and each row's arg-max
    denom = e.sum(dim=1)
    r = p.sum(dim=1) - n_keys * torch.log(denom + 1e-12)  # (3.11)
    z = (p != 0).sum()  # (3.12)
    keep = (z > 0) & (denom > 0) & (r < 0)  # the gate of (3.13)
    loss = -(tau / tau_base) * torch.where(keep, r, torch.zeros_like(r)).sum() / (q.shape[0] * z.clamp_min(1))
    return loss, f_revised, noisy


def _supcon(logits, f, g, noisy, tau: float, tau_base: float) -> torch.Tensor:
    """(3.14): mean log-probability of positives among a row's candidates (own key and -1 keys excluded)."""
    n, m = logits.shape
    own = torch.zeros(n, m, dtype=torch.bool, device=logits.device)
    own[:, :n] = torch.eye(n, dtype=torch.bool, device=logits.device)
    candidate = (g != -1)[None, :] & ~own
    log_prob = logits.masked_fill(~candidate, float("-inf")).log_softmax(dim=1)
    positive = candidate & (f[:, None] == g[None, :])
    n_pos = positive.sum(1)
    anchors = (f != -1) & ~noisy
    per_row = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp_min(1)
    used = anchors & (n_pos > 0)
    return -(tau / tau_base) * (per_row * used).sum() / anchors.sum().clamp_min(1)


@float32
def lig_loss(
    q: torch.Tensor, prototypes: torch.Tensor, f: torch.Tensor, tau: float = 0.1, tau_base: float = 0.1
) -> torch.Tensor:
    """LIG, local-to-global prototype contrast (3.15)-(3.17), code mode.

    ``q`` (N, D) anchors, ``prototypes`` (K, D), ``f`` (N,) revised tags from LIL. The softmax runs over the classes
    present among the tags; rows tagged 0 or -1 contribute nothing.
    """
    num_classes = prototypes.shape[0]
    l = q @ prototypes.t() / tau  # (3.15)
    positive = f >= 1
    # (3.16) classes among the tags, by a scatter (no host sync); tags 0 and -1 land in the dropped slot 0
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=q.device).scatter_(0, f.clamp_min(0), True)[1:]
    e = (l * present[None, :]).exp()
    e = e * (e != 1)  # removes classes outside the batch (zeroed logits), as the code does
    own = l.gather(1, (f - 1).clamp_min(0)[:, None])[:, 0]
    rows = positive & (own != 0)
    terms = own - torch.log(e.sum(dim=1) + 1e-12)
    count = positive.sum()
    denom = torch.where(count > 0, count, torch.full_like(count, q.shape[0]))
    return -(tau / tau_base) * torch.where(rows, terms, torch.zeros_like(terms)).sum() / denom


def label_to_aff_mask(label: torch.Tensor) -> torch.Tensor:
    """(1.7) (B, h, w) labels -> (B, hw, hw) pair mask: 1 same label, 0 different, 255 ignore or diagonal."""
    flat = label.flatten(1)
    mask = (flat[:, :, None] == flat[:, None, :]).long()
    ignore = flat == IGNORE_INDEX
    mask = mask.masked_fill(ignore[:, :, None] | ignore[:, None, :], IGNORE_INDEX)
    eye = torch.eye(flat.shape[1], dtype=torch.bool, device=label.device)
    return mask.masked_fill(eye[None], IGNORE_INDEX)


def ptc_loss(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PTC (3.18): pull same-label token pairs to |cos| = 1, push different-label pairs to 0.

    ``L = 1/2 (1 - sum_{R=1} Ccos / (#{R=1} + 1)) + 1/2 sum_{R=0} Ccos / (#{R=0} + 1)``, ``Ccos`` the absolute
    cosine of the unit tokens, sums over the whole batch.
    ``feats`` (B, D, h, w) final-layer tokens ``F_tok``; ``labels`` (B, h, w) the aux-CAM token labels ``l_aux``
    (255 = ignore). The pair mask ``R`` of (1.7) (``label_to_aff_mask``) is implied, never built: the fused
    ``wsss.kernels.masked_ptc`` (Triton on CUDA) forms the pair classes tile by tile.
    """
    return masked_ptc(feats, labels)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(3.19) Cross-entropy averaged over background and foreground pixels separately (0, not NaN, when empty)."""
    up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, target.long(), ignore_index=IGNORE_INDEX, reduction="none")
    bg = (target == 0).float()
    fg = ((target > 0) & (target != IGNORE_INDEX)).float()
    return 0.5 * ((ce * bg).sum() / (bg.sum() + 1e-6) + (ce * fg).sum() / (fg.sum() + 1e-6))


class _DenseEnergy(torch.autograd.Function):
    """E = -(1/B) sum Sm . (W * Sm) . Gt with the official custom gradient -(2/B) (W * Sm) . Gt (gate constant)."""

    @staticmethod
    @float32  # the GEMM form of the distance needs float32
    def forward(ctx, probs, features, gate, chunk: int):
        b, c, h, w = probs.shape
        flat = probs.flatten(2).transpose(1, 2)  # (B, P, C)
        feats = features.flatten(2).transpose(1, 2)  # (B, P, 5)
        filtered = torch.empty_like(flat)
        half_sq = 0.5 * feats.square().sum(-1)  # (B, P)
        for start in range(0, flat.shape[1], chunk):  # exact Gaussian, a block of rows at a time
            rows = slice(start, start + chunk)
            # -|f_i - f_j|^2 / 2 = f_i.f_j - |f_i|^2 / 2 - |f_j|^2 / 2: one batched GEMM, then in place
            logits = torch.baddbmm(-half_sq[:, None], feats[:, rows], feats.transpose(1, 2))
            logits.sub_(half_sq[:, rows, None]).clamp_max_(0)
            filtered[:, rows] = logits.exp_() @ flat
        filtered = filtered.transpose(1, 2).reshape(b, c, h, w)
        ctx.save_for_backward(filtered, gate)
        return -(probs * filtered * gate).sum() / b

    @staticmethod
    def backward(ctx, grad):
        filtered, gate = ctx.saved_tensors
        return -2 * grad * filtered * gate / filtered.shape[0], None, None, None


def dense_energy_loss(
    image: torch.Tensor, seg_logits: torch.Tensor, valid: torch.Tensor, target: torch.Tensor,
    sigma_xy: float = 100.0, sigma_rgb: float = 15.0, scale: float = 0.5, chunk: int = 4096,
) -> torch.Tensor:  # fmt: skip
    """Dense-energy regulariser (§3.12) with an exact (blockwise) bilateral Gaussian instead of a lattice.

    ``image`` (B, 3, H, W) in [0, 255]; ``seg_logits`` (B, C, H, W) upsampled decoder logits; ``valid`` (B, H, W)
    the image box; ``target`` (B, H, W) the pseudo-labels (255 = ignore). Multiply by ``w_reg * 1e-7`` as SeCo does.
    """
    size = (int(image.shape[-2] * scale), int(image.shape[-1] * scale))
    img = F.interpolate(image, size=size, mode="nearest")
    probs = F.interpolate(seg_logits.softmax(1), size=size, mode="bilinear", align_corners=False)
    roi = F.interpolate(valid[:, None].float(), size=size, mode="nearest")
    tgt = F.interpolate(target[:, None].float(), size=size, mode="nearest")
    gate = (roi - probs.amax(1, keepdim=True)).masked_fill(tgt == IGNORE_INDEX, 1).clamp_min(0).detach()
    probs = probs * roi
    ys, xs = torch.meshgrid(torch.arange(size[0], device=image.device), torch.arange(size[1], device=image.device),
                            indexing="ij")  # fmt: skip
    xy = torch.stack([xs, ys]).float()[None].expand(image.shape[0], -1, -1, -1) / (sigma_xy * scale)
    features = torch.cat([xy, img / sigma_rgb], dim=1)  # (B, 5, h, w)
    return _DenseEnergy.apply(probs, features, gate, chunk)
