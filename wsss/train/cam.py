"""The plain CAM objective (Zhou et al. 2016; §1.2), and its mask-supervised form for pre-training backbones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.palette import IGNORE_INDEX


class CAMObjective(nn.Module):
    """Plain CAM (1.2): ``L_cls = MLSM(z, y)`` on globally max-pooled patch features.

    ``data.hide`` > 0 adds Hide-and-Seek (Singh & Lee, ICCV 2017): each ``data.hide_cell`` square of the crop is
    hidden with that probability (set to 0, the normalised mean), so the tag must be found from any visible part.
    """

    def __init__(self, model: nn.Module, cfg: dict):
        super().__init__()
        self.hide, self.hide_cell = float(cfg["data"].get("hide", 0.0)), int(cfg["data"].get("hide_cell", 16))

    def trainable(self) -> list[nn.Parameter]:
        return []

    def forward(self, net: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        image = batch["image"]
        if self.hide > 0:
            image = hide_patches(image, self.hide, self.hide_cell)
        logits, _ = net(image)
        loss = F.multilabel_soft_margin_loss(logits, batch["labels"])
        return {"loss": loss, "cls": loss}


def hide_patches(image: torch.Tensor, p: float, cell: int) -> torch.Tensor:
    """Zero each ``cell`` x ``cell`` square of every image with probability ``p`` (one draw per square)."""
    b, _, h, w = image.shape
    keep = torch.rand(b, 1, -(-h // cell), -(-w // cell), device=image.device) >= p
    keep = keep.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[..., :h, :w]
    return image * keep.to(image.dtype)


class MaskedCAMObjective(nn.Module):
    """A CAM network taught by masks: the pre-training stand-in for ImageNet weights (``"supervision": "masks"``).

    Not weakly supervised, and never used on a set that is measured: it pre-trains the shipped tiny backbones on a
    synthetic corpus whose masks are known, where a tag per image would teach a from-scratch ViT too little in a
    CPU budget (issue 20). Two terms on the crop's mask (0 background, k = class k, 255 ignored):

    * ``cls``: (1.2) with the tags of the classes left in the crop (a crop that cuts an object off drops its tag);
    * ``dense``: every patch token's raw CAM ``A_k`` against ``m_k / v``, the share of its valid pixels that are
      class k (``m_k``: the token's fraction of class-k pixels, ``v``: of valid ones), by binary cross-entropy,
      averaged over tokens and classes with weight ``v``: ``sum(v * BCE(A_k, m_k / v)) / (K * sum(v))``.
    """

    def __init__(self, model: nn.Module, cfg: dict):
        super().__init__()
        self.dense_weight = float(cfg["pretrain"]["dense_weight"])

    def trainable(self) -> list[nn.Parameter]:
        return []

    def forward(self, net: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits, cams = net(batch["image"])
        fractions, valid = token_fractions(batch["mask"], logits.shape[1], cams.shape[-2:])
        cls = F.multilabel_soft_margin_loss(logits, (fractions.amax((2, 3)) > 0).to(logits.dtype))
        target = fractions / valid.clamp_min(1e-6)
        bce = F.binary_cross_entropy_with_logits(cams.float(), target, reduction="none")
        dense = (bce * valid).sum() / (valid.sum() * cams.shape[1]).clamp_min(1.0)
        return {"loss": cls + self.dense_weight * dense, "cls": cls, "dense": dense}


def token_fractions(mask: torch.Tensor, num_fg: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) class mask -> per-token fractions of each foreground class (B, K, h, w) and of valid pixels
    (B, 1, h, w), over the pixels each token of the floored ``grid`` covers (an ``H // h`` patch)."""
    h, w = grid
    p_h, p_w = mask.shape[-2] // h, mask.shape[-1] // w
    mask = mask[:, : h * p_h, : w * p_w]
    valid = mask != IGNORE_INDEX
    onehot = F.one_hot(torch.where(valid, mask, 0).long(), num_fg + 1).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    pooled = F.avg_pool2d(onehot, (p_h, p_w))
    return pooled[:, 1:], pooled.sum(1, keepdim=True)
