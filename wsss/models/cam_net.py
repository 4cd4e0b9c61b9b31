"""Plain CAM network (Zhou et al. 2016) on a ViT: patch tokens -> 1x1 classifier -> CAMs, pooled for logits."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import BackboneConfig, create_vit, forward_tokens, patch_size, token_grid, token_map
from .spec import register_family


class CAMNet(nn.Module):
    """ViT features ``F`` (B, D, h, w) with a bias-free 1x1 classifier ``W`` (K x D).

    Logits (1.1): ``z = W . GMP(F)`` (``pooling="gmp"``) or ``W . GAP(F)``; CAMs (1.3): ``A = W . F``.
    ``K`` counts foreground classes only; background comes from a threshold on the normalised CAM.
    """

    def __init__(self, backbone: BackboneConfig, num_fg: int, pooling: str = "gmp"):
        super().__init__()
        if pooling not in ("gmp", "gap"):
            raise ValueError(f"pooling must be 'gmp' or 'gap', got {pooling!r}")
        self.backbone = create_vit(backbone)
        self.patch_size = patch_size(self.backbone)
        self.pooling = pooling
        self.classifier = nn.Conv2d(self.backbone.embed_dim, num_fg, 1, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm-ed patch tokens as a (B, D, h, w) map (prefix tokens dropped; the grid floors)."""
        tokens, _ = forward_tokens(self.backbone, x)
        return token_map(tokens, self.backbone.num_prefix_tokens, token_grid(x, self.patch_size))

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        pooled = feats.amax(dim=(2, 3), keepdim=True) if self.pooling == "gmp" else feats.mean((2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits (B, K) and raw CAMs (B, K, h, w)."""
        feats = self.features(x)
        return self.pool(feats), self.classifier(feats)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters): heads train at 10x the base learning rate (§3.14)."""
        return list(self.backbone.parameters()), list(self.classifier.parameters())


@register_family("cam")
def build_cam_net(arch: dict, num_fg: int) -> CAMNet:
    return CAMNet(BackboneConfig(**arch["backbone"]), num_fg, pooling=arch.get("pooling", "gmp"))
