"""CoBra's objectives (§4.5, §4.6, §4.11): classification, L1 CAM consistency, CAP and SAP patch contrast.

Names follow the paper (D1): CAP refines the CNN projection ``v^c`` with the ViT patch affinity; SAP refines the
ViT projection ``v^s`` with the CNN pseudo labels. Every anchor is handled at once: candidates are ranked per
class or per affinity row, gathered as indices, and the InfoNCE terms come from one fused call
(``wsss.kernels.patch_infonce``); nothing loops over patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import patch_infonce
from ..models.cobra import image_logits
from .precision import float32


def stable_topk(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Indices of the ``k`` highest (lowest) scores along the last axis; equal scores: lowest index first (D5)."""
    if k > scores.shape[-1]:
        raise ValueError(f"k = {k} exceeds the {scores.shape[-1]} candidates")
    return torch.sort(scores, dim=-1, descending=largest, stable=True).indices[..., :k]


def cls_loss(m: torch.Tensor, labels: torch.Tensor, pooling: str = "gap") -> torch.Tensor:
    """(4.6) multilabel soft margin on ``GAP(M[:, 1:])`` (D10; ``pooling="gmp"``: the spatial max instead)."""
    return F.multilabel_soft_margin_loss(image_logits(m, pooling), labels)


def cam_l1_loss(m_cnn: torch.Tensor, m_tran: torch.Tensor, labels: torch.Tensor, size: int, terms: str = "both"):
    """(4.7)/(4.15) L1 consistency of the raw 21-channel maps at the crop size (bilinear, align_corners=True).

    ``"all_only"`` is the code's term: mean over batch, channels and pixels. ``"both"`` (paper, D6) adds the
    positive-class term: the batch mean of per-image means over each image's present foreground channels (NaN
    for an image without labels, propagated on purpose).
    """
    if terms not in ("both", "all_only"):
        raise ValueError(f"cam_l1_terms must be 'both' or 'all_only', got {terms!r}")
    diff = (_up(m_cnn, size) - _up(m_tran, size)).abs()
    loss = diff.mean()
    if terms == "both":
        per_image = (diff[:, 1:].sum((2, 3)) * labels).sum(1) / (labels.sum(1) * size * size)
        loss = loss + per_image.mean()
    return loss


def _up(m: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=True)


def pseudo_labels(m_cnn: torch.Tensor, labels: torch.Tensor, absent_mask: str = "neg_inf"):
    """CNN pseudo labels ``y_i = argmax_c softmax_c(M_cnn)`` over the image's classes (§4.6 step 1, D5).

    ``absent_mask="neg_inf"`` (paper) excludes absent classes; ``"zero"`` (code) multiplies their logits by 0, so
    they can win where every present channel is negative (Q4.5). Returns (probabilities (B, C, N), labels (B, N)),
    ties to the first channel.
    """
    y_bg = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)[:, :, None]
    logits = m_cnn.flatten(2)
    if absent_mask == "zero":
        logits = logits * y_bg
    elif absent_mask == "neg_inf":
        logits = logits.masked_fill(y_bg == 0, float("-inf"))
    else:
        raise ValueError(f"absent_mask must be 'neg_inf' or 'zero', got {absent_mask!r}")
    probs = logits.softmax(1)
    return probs, probs.argmax(1)


def contrast_reduce(per_anchor: torch.Tensor, anchors: torch.Tensor, k_pos: int, reduction: str) -> torch.Tensor:
    """(D3) ``"mean"``: over all (anchor, positive) pairs of the batch (0 without anchors, graph kept);
    ``"paper_sum"``: ``(1/B) sum_b sum_{i in A_b} (1/k+) L_i``. ``per_anchor`` holds ``sum_j -log(X/(X+Y))``."""
    total = (per_anchor * anchors).sum()
    if reduction == "mean":
        return total / (k_pos * anchors.sum()).clamp_min(1)
    if reduction == "paper_sum":
        return total / (k_pos * per_anchor.shape[0])
    raise ValueError(f"contrast_reduction must be 'mean' or 'paper_sum', got {reduction!r}")


@float32  # ranks the affinity and divides by tau: bf16 would tie and reorder
def cap_loss(v_c: torch.Tensor, affinity: torch.Tensor, k_pos: int = 5, k_neg: int = 20, tau: float = 0.1,
             reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """(4.8) CAP: every CNN patch embedding ``v^c_i`` is pulled to its top-``k+`` and pushed from its bottom-``k-``
    patches by the ViT affinity row ``P_i`` (indices only: no gradient reaches the ViT)."""
    affinity = affinity.detach()
    pos, neg = stable_topk(affinity, k_pos, True), stable_topk(affinity, k_neg, False)
    per_anchor = patch_infonce(v_c, pos, neg, tau, "paper")
    return contrast_reduce(per_anchor, torch.ones_like(per_anchor), k_pos, reduction)


@float32  # ranks the CNN scores and divides by tau
def sap_loss(
    v_s: torch.Tensor,
    m_cnn: torch.Tensor,
    labels: torch.Tensor,
    k_pos: int = 20,
    k_neg: int = 5,
    tau: float = 0.1,
    rank: str = "prob",
    absent_mask: str = "neg_inf",
    anchors: str = "positive",
    neg_exp: str = "paper",
    reduction: str = "mean",
) -> torch.Tensor:
    """(4.9) SAP: ViT patch embeddings ``v^s_i`` pulled to the top-``k+`` and pushed from the bottom-``k-`` patches
    by the CNN score of ``i``'s pseudo class (indices only: no gradient reaches the CNN).

    ``rank``: ``"prob"`` (paper: softmax probability) or ``"raw_cam"`` (code: raw CNN CAM); ``anchors``:
    ``"positive"`` (paper, D4: patches with a foreground pseudo label) or ``"all"`` (code); ``neg_exp``:
    ``"paper"`` or ``"code"`` (exp before /tau, D2). Per class the patches are ranked once, then gathered per
    anchor by its pseudo label, which equals ranking every anchor's row.
    """
    probs, y_hat = pseudo_labels(m_cnn.detach(), labels, absent_mask)
    if rank == "prob":
        scores = probs
    elif rank == "raw_cam":
        scores = m_cnn.detach().flatten(2)
    else:
        raise ValueError(f"pseudo_rank must be 'prob' or 'raw_cam', got {rank!r}")
    index = y_hat[:, :, None]
    pos = stable_topk(scores, k_pos, True).gather(1, index.expand(-1, -1, k_pos))
    neg = stable_topk(scores, k_neg, False).gather(1, index.expand(-1, -1, k_neg))
    per_anchor = patch_infonce(v_s, pos, neg, tau, neg_exp)
    if anchors == "positive":
        mask = (y_hat != 0).to(per_anchor.dtype)
    elif anchors == "all":
        mask = torch.ones_like(per_anchor)
    else:
        raise ValueError(f"sap_anchors must be 'positive' or 'all', got {anchors!r}")
    return contrast_reduce(per_anchor, mask, k_pos, reduction)
