"""The plain CAM objective (Zhou et al. 2016; §1.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CAMObjective(nn.Module):
    """Plain CAM (1.2): ``L_cls = MLSM(z, y)`` on globally max-pooled patch features."""

    def __init__(self, model: nn.Module, cfg: dict):
        super().__init__()

    def trainable(self) -> list[nn.Parameter]:
        return []

    def forward(self, net: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits, _ = net(batch["image"])
        loss = F.multilabel_soft_margin_loss(logits, batch["labels"])
        return {"loss": loss, "cls": loss}
