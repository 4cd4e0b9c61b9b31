"""SeCo's student network at inference: ViT encoder, CAM and auxiliary-CAM classifiers, ASPP decoder.

§1.1, §1.2 and §3.5. The training-only parts (key encoder, projection heads, prototype bank, queue) are not
needed to produce CAMs or segmentations and are not part of this module.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import BackboneConfig, create_vit, forward_tokens, patch_size, token_grid, token_map
from .spec import register_family


class ASPP(nn.Module):
    """DeepLab-v2 head: parallel 3x3 convolutions at dilations (6, 12, 18, 24), summed; C outputs incl. background."""

    def __init__(self, in_dim: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(in_dim, num_classes, 3, padding=rate, dilation=rate, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.children())


class SeCoNet(nn.Module):
    """Student of SeCo: ``z = W . GMP(F)``, ``z_aux = W_aux . GMP(F_aux)``, CAMs ``W . F``, segmentation ASPP(F).

    ``F`` is the final LayerNorm-ed patch-token map and ``F_aux`` the output of block ``depth + aux_layer``
    (``aux_layer = -3``: the 10th of 12 blocks) without the final norm.
    """

    def __init__(self, backbone: BackboneConfig, num_fg: int, aux_layer: int = -3):
        super().__init__()
        self.backbone = create_vit(backbone)
        self.patch_size = patch_size(self.backbone)
        self.aux_index = len(self.backbone.blocks) + aux_layer
        if not 0 <= self.aux_index < len(self.backbone.blocks):
            raise ValueError(f"aux_layer {aux_layer} is outside a {len(self.backbone.blocks)}-block encoder")
        dim = self.backbone.embed_dim
        self.classifier = nn.Conv2d(dim, num_fg, 1, bias=False)
        self.aux_classifier = nn.Conv2d(dim, num_fg, 1, bias=False)
        self.decoder = ASPP(dim, num_fg + 1)
        for conv in self.decoder.children():  # N(0, 0.01) weights, zero biases (§3.5)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.backbone.pos_embed.requires_grad_(False)  # frozen in SeCo (§1.1)

    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F`` and ``F_aux`` as (B, D, h, w) maps (the grid floors at sizes that are not patch multiples)."""
        final, aux = forward_tokens(self.backbone, x, self.aux_index)
        grid = token_grid(x, self.patch_size)
        n = self.backbone.num_prefix_tokens
        return token_map(final, n, grid), token_map(aux, n, grid)

    def forward(self, x: torch.Tensor, mode: str = "cam"):
        """``"cam"``: logits (B, K) and CAMs (B, K, h, w) of the main classifier (the CAM-network interface);
        ``"cams"``: the same with the auxiliary CAMs appended (B, 2K, h, w); ``"cls"``: final CLS tokens (B, D);
        ``"train"``: everything a SeCo training step needs, as a dict."""
        if mode == "cls":
            return forward_tokens(self.backbone, x)[0][:, 0]
        if mode == "train":
            return self._train_outputs(x)
        feats, aux = self.feature_maps(x)
        logits = self.classifier(feats.amax(dim=(2, 3), keepdim=True)).flatten(1)
        if mode == "cams":
            return logits, torch.cat([self.classifier(feats), self.aux_classifier(aux)], dim=1)
        return logits, self.classifier(feats)

    def _train_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        final, aux = forward_tokens(self.backbone, x, self.aux_index)
        grid, n = token_grid(x, self.patch_size), self.backbone.num_prefix_tokens
        feats, aux_feats = token_map(final, n, grid), token_map(aux, n, grid)
        return {
            "cls": final[:, 0], "feats": feats, "seg": self.decoder(feats),
            "logits": self.classifier(feats.amax(dim=(2, 3), keepdim=True)).flatten(1),
            "aux_logits": self.aux_classifier(aux_feats.amax(dim=(2, 3), keepdim=True)).flatten(1),
        }  # fmt: skip

    def aux_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Auxiliary logits and CAMs from ``F_aux``."""
        _, aux = self.feature_maps(x)
        return self.aux_classifier(aux.amax(dim=(2, 3), keepdim=True)).flatten(1), self.aux_classifier(aux)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B, C, h, w) at feature resolution, background in channel 0."""
        feats, _ = self.feature_maps(x)
        return self.decoder(feats)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        heads = [*self.classifier.parameters(), *self.aux_classifier.parameters(), *self.decoder.parameters()]
        return list(self.backbone.parameters()), heads


@register_family("seco")
def build_seco_net(arch: dict, num_fg: int) -> SeCoNet:
    return SeCoNet(BackboneConfig(**arch["backbone"]), num_fg, aux_layer=arch.get("aux_layer", -3))


class ProjectionHead(nn.Module):
    """DINO-style head ``phi`` (§3.5): Linear-GELU-Linear-GELU-Linear, then L2 normalisation.

    Official key names (``mlp.0/2/4``); DINO's weight-normalised ``last_layer`` is built but never used by SeCo's
    forward pass, so it is left out.
    """

    def __init__(self, in_dim: int = 768, hidden_dim: int = 2048, out_dim: int = 768):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )  # fmt: skip
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.mlp(x), dim=-1)
