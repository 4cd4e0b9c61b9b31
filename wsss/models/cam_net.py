"""Plain CAM network (Zhou et al. 2016) on a ViT or a CNN: features -> 1x1 classifier -> CAMs, pooled for logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneConfig, create_vit, forward_tokens, patch_size, token_grid, token_map
from .spec import register_family
from .vgg import VGGConfig, VGGTrunk

POOLINGS = ("gmp", "gap", "lse")


class CAMNet(nn.Module):
    """Features ``F`` (B, D, h, w) with a bias-free 1x1 classifier ``W`` (K x D).

    Logits (1.1): ``z = W . GMP(F)`` (``pooling="gmp"``) or ``W . GAP(F)``; CAMs (1.3): ``A = W . F``. With GMP of
    the features ``z_k != max_p A[k, p]`` (§1.1): a logit can sum channel maxima found at different places.
    ``pooling="lse"`` pools the CAM itself, ``z_k = (1/r) log mean_p exp(r A[k, p])`` (log-sum-exp, Pinheiro and
    Collobert 2015): the mean of the CAM at ``r -> 0``, its maximum at ``r -> inf``.
    ``K`` counts foreground classes only; background comes from a threshold on the normalised CAM. ``F`` is a
    ViT's patch tokens (``BackboneConfig``) or a VGG trunk's map (``VGGConfig``, at its ``output_stride``).
    """

    def __init__(self, backbone: BackboneConfig | VGGConfig, num_fg: int, pooling: str = "gmp", lse_r: float = 5.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not lse_r > 0:
            raise ValueError(f"lse_r must be > 0, got {lse_r!r}")
        if isinstance(backbone, VGGConfig):
            self.backbone = VGGTrunk(backbone)
            self.patch_size, dim = backbone.output_stride, self.backbone.out_channels
        else:
            self.backbone = create_vit(backbone)
            self.patch_size, dim = patch_size(self.backbone), self.backbone.embed_dim
        self.pooling, self.lse_r = pooling, float(lse_r)
        self.classifier = nn.Conv2d(dim, num_fg, 1, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, D, h, w) map: the CNN's last stage, or the final LayerNorm-ed patch tokens (prefix tokens dropped;
        the grid floors)."""
        if isinstance(self.backbone, VGGTrunk):
            return self.backbone(x)
        tokens, _ = forward_tokens(self.backbone, x)
        return token_map(tokens, self.backbone.num_prefix_tokens, token_grid(x, self.patch_size))

    def pool(self, feats: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        """Image logits (B, K) from the features and their CAMs."""
        if self.pooling == "lse":
            r, n = self.lse_r, cams.shape[2] * cams.shape[3]
            return (torch.logsumexp(r * cams.flatten(2), dim=2) - math.log(n)) / r
        pooled = feats.amax(dim=(2, 3), keepdim=True) if self.pooling == "gmp" else feats.mean((2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits (B, K) and raw CAMs (B, K, h, w)."""
        feats = self.features(x)
        cams = self.classifier(feats)
        return self.pool(feats, cams), cams

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters): heads train at 10x the base learning rate (§3.14)."""
        return list(self.backbone.parameters()), list(self.classifier.parameters())

    def layer_cams(self, x: torch.Tensor, stages: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits (B, K) and the CAM fused with LayerCAM maps (Jiang et al., TIP 2021) of VGG ``stages``.

        For stage map ``a`` (B, C, h, w) and class k, ``M_k = ReLU(sum_c ReLU(dz_k / da_c) * a_c)``: each position
        weighted by its own positive gradient, so a shallow stage marks the pixels that drive ``z_k`` (the strokes
        of a thin outline) where the last stage's CAM peaks at the centre of its receptive field. The ReLU'd CAM
        and each ``M`` are divided by their per-image, per-class maximum, resized bilinearly to the finest grid
        among them and averaged; the pipeline's upsampling and normalisation (§1.3) follow unchanged.
        """
        if not isinstance(self.backbone, VGGTrunk):
            raise ValueError("cam.layers (LayerCAM) reads the stages of a VGG trunk; this network is a ViT")
        bad = [i for i in stages if not 0 <= i < self.backbone.cfg.stages]
        if bad:
            raise ValueError(f"cam.layers {list(stages)}: the VGG trunk has stages 0..{self.backbone.cfg.stages - 1}")
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # records the graph even when no weight requires grad
            feats, acts = self.backbone.forward_stages(x, stages)
            cams = self.classifier(feats)
            logits = self.pool(feats, cams)
            k = logits.shape[1]
            one_hot = torch.eye(k, dtype=logits.dtype, device=logits.device)[:, None].expand(k, *logits.shape)
            grads = torch.autograd.grad(logits, acts, one_hot, is_grads_batched=True) if acts else ()
        maps = [cams.detach().relu()]
        maps += [(g.relu() * a.detach()).sum(2).relu().transpose(0, 1) for g, a in zip(grads, acts, strict=True)]
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        fused = sum(F.interpolate(_max_normalised(m), size=size, mode="bilinear", align_corners=False) for m in maps)
        return logits.detach(), fused / len(maps)


def _max_normalised(m: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) non-negative maps divided by their per-(image, class) maximum (all-zero maps stay zero)."""
    return m / m.amax((2, 3), keepdim=True).clamp_min(1e-5)


@register_family("cam")
def build_cam_net(arch: dict, num_fg: int) -> CAMNet:
    backbone = arch["backbone"]
    if backbone.get("kind") == "vgg":
        cfg = VGGConfig.from_dict(backbone)
        if int(arch.get("output_stride", cfg.output_stride)) != cfg.output_stride:
            raise ValueError(f"CAM arch output_stride {arch['output_stride']} != the VGG trunk's {cfg.output_stride}")
    else:
        cfg = BackboneConfig(**backbone)
    return CAMNet(cfg, num_fg, pooling=arch.get("pooling", "gmp"), lse_r=arch.get("lse_r", 5.0))
