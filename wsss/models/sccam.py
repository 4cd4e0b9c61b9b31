"""Sub-category exploration (SC-CAM, Chang et al. 2020; §7.2): a CNN with a parent and a sub-category classifier.

The official network is a ResNet-38 (output stride 8) whose last feature map goes through ``Dropout2d(0.5)`` and
global average pooling into ``f``; the parent head ``H_p`` (1x1 conv, C_f -> C, no bias) and the sub-category
head ``H_s`` (1x1 conv, C_f -> C*K, no bias) both read ``f``. CAMs come from the parent head on the feature map.
Here the trunk is any ``ResNetTrunk`` (timm ResNets, or the shipped tiny one); ``sub_k = 0`` is the plain
classifier of round 0 (the official ``from_round_nb == 0`` network has no ``H_s``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .resnet import ResNetConfig, ResNetTrunk
from .spec import register_family


class SCCAMNet(nn.Module):
    """ResNet features ``F`` (B, C_f, h, w); ``f = GAP(Dropout2d(F))``; ``z = H_p f``, ``s = H_s f``; CAM ``H_p F``."""

    def __init__(self, backbone: ResNetConfig, num_fg: int, sub_k: int = 10, dropout: float = 0.5):
        super().__init__()
        if sub_k < 0:
            raise ValueError(f"sub_k (sub-categories per class) must be >= 0, got {sub_k}")
        self.backbone = ResNetTrunk(backbone)
        self.num_fg, self.sub_k = num_fg, sub_k
        self.dropout = nn.Dropout2d(dropout)
        c = self.backbone.out_channels
        self.parent = nn.Conv2d(c, num_fg, 1, bias=False)  # H_p
        self.sub = nn.Conv2d(c, num_fg * sub_k, 1, bias=False) if sub_k else None  # H_s, index c*K + cluster
        for head in (self.parent, self.sub):
            if head is not None:
                nn.init.xavier_uniform_(head.weight)  # as the official heads

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_channels

    def pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature map F, pooled feature f (B, C_f, 1, 1)); dropout acts in training mode only."""
        feats = self.backbone(x)
        return feats, self.dropout(feats).mean((2, 3), keepdim=True)

    def forward(self, x: torch.Tensor, mode: str = "cam"):
        """``cam``: parent logits (B, C) and raw CAMs ``H_p F`` (B, C, h, w) for the CAM path (ReLU comes there).
        ``joint``: parent logits (B, C) and sub-category logits (B, C*K) for (7.10). ``feature``: ``f`` (B, C_f),
        the clustering feature (7.9)."""
        feats, f = self.pooled(x)
        if mode == "feature":
            return f.flatten(1)
        z = self.parent(f).flatten(1)
        if mode == "joint":
            if self.sub is None:
                raise ValueError("a round-0 SC-CAM network (sub_k=0) has no sub-category head")
            return z, self.sub(f).flatten(1)
        if mode != "cam":
            raise ValueError(f"mode must be 'cam', 'joint' or 'feature', got {mode!r}")
        return z, self.parent(feats)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trunk parameters, head parameters): the heads are trained from scratch at 10x the rate (§7.2)."""
        heads = [*self.parent.parameters(), *(self.sub.parameters() if self.sub is not None else ())]
        return [p for p in self.backbone.parameters() if p.requires_grad], heads


def trunk_stride(cfg: ResNetConfig) -> int:
    """Output stride of a trunk: the stride-4 stem times the stage strides."""
    return 4 * math.prod(cfg.strides)


@register_family("sccam")
def build_sccam_net(arch: dict, num_fg: int) -> SCCAMNet:
    # img_size: the training crop, the reference size of native-size exports (wsss.export.onnx.reference_size)
    backbone = ResNetConfig.from_dict({k: v for k, v in arch["backbone"].items() if k != "img_size"})
    if "output_stride" in arch and int(arch["output_stride"]) != trunk_stride(backbone):
        raise ValueError(f"SC-CAM arch output_stride {arch['output_stride']} != the trunk's {trunk_stride(backbone)}")
    return SCCAMNet(backbone, num_fg, int(arch.get("sub_k", 10)), float(arch.get("dropout", 0.5)))
