"""IRN's edge/displacement network (§6.4) on a frozen ResNet trunk, and its flip-averaged edge inference (§6.8).

The trunk only provides features: it stays in eval mode and its stage outputs are detached, so only the two heads
train. Both heads work at stride 4 (the resolution of ``layer1``):

* the *edge* branch predicts one class-boundary logit ``E`` per pixel, from which pair affinities (6.3)/(6.7) follow;
* the *displacement* branch predicts a 2-vector ``delta`` per pixel (towards its instance centroid; trained by
  (6.5), used here only through its training signal).

The model knows nothing of training; losses and the schedule live in :mod:`wsss.train.irn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNetConfig, ResNetTrunk
from .spec import register_family

EDGE_CH = 32  # width of each edge projection (§6.4)
EDGE_LAYERS = ("edge1", "edge2", "edge3", "edge4", "edge5", "edge6")  # trained at 1x LR
DISP_LAYERS = ("dp1", "dp2", "dp3", "dp4", "dp5", "dp6", "dp7")  # trained at 10x LR


def _proj(c_in: int, c_out: int, groups: int, scale: int = 1) -> nn.Sequential:
    """1x1 conv (no bias) + GroupNorm, an optional bilinear upsampling (align_corners=False), then ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out)]
    if scale > 1:
        layers.append(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _crop_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Top-left crop of ``x`` to the spatial size of ``ref`` (upsampled maps are never smaller)."""
    return x[..., : ref.shape[-2], : ref.shape[-1]]


class MeanShift(nn.Module):
    """Subtracts a stored 2-vector mean from the displacement field, in eval mode only (§6.4, §6.7)."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else x - self.running_mean.view(1, -1, 1, 1)


class EdgeDisplacement(nn.Module):
    """IRN's class-boundary and displacement heads on the five stages x1..x5 of a ResNet trunk (§6.4).

    Input projections take their widths from the trunk's stage channels, so any ResNet depth works (ResNet-50:
    64/256/512/1024/2048; the tiny custom trunk of the tests as well). The head widths are the paper's.
    """

    def __init__(self, backbone: ResNetConfig | ResNetTrunk):
        super().__init__()
        self.trunk = backbone if isinstance(backbone, ResNetTrunk) else ResNetTrunk(backbone)
        for p in self.trunk.parameters():
            p.requires_grad_(False)  # stage outputs are detached anyway; this keeps the trunk out of optimisers
        c1, c2, c3, c4, c5 = stage_channels(self.trunk)
        # edge branch: x1, x2 at stride 4; x3 (s8) x2 up; x4, x5 (s16) x4 up; concat 160 -> 1 logit
        self.edge1 = _proj(c1, EDGE_CH, 4)
        self.edge2 = _proj(c2, EDGE_CH, 4)
        self.edge3 = _proj(c3, EDGE_CH, 4, scale=2)
        self.edge4 = _proj(c4, EDGE_CH, 4, scale=4)
        self.edge5 = _proj(c5, EDGE_CH, 4, scale=4)
        self.edge6 = nn.Conv2d(5 * EDGE_CH, 1, 1, bias=True)
        # displacement branch
        self.dp1 = _proj(c1, 64, 8)
        self.dp2 = _proj(c2, 128, 16)
        self.dp3 = _proj(c3, 256, 16)
        self.dp4 = _proj(c4, 256, 16, scale=2)
        self.dp5 = _proj(c5, 256, 16, scale=2)
        self.dp6 = _proj(768, 256, 16, scale=2)
        self.dp7 = nn.Sequential(
            nn.Conv2d(64 + 128 + 256, 256, 1, bias=False),
            nn.GroupNorm(16, 256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 2, 1, bias=False),
            MeanShift(2),
        )
        self.trunk.eval()

    @property
    def mean_shift(self) -> MeanShift:
        return self.dp7[-1]

    def train(self, mode: bool = True) -> EdgeDisplacement:
        """Heads follow ``mode``; the trunk always stays in eval mode (§6.4)."""
        super().train(mode)
        self.trunk.eval()
        return self

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(edge parameters, displacement parameters): trained at 1x and 10x the base LR (§6.4)."""

        def params(names: tuple[str, ...]) -> list[nn.Parameter]:
            return [p for name in names for p in getattr(self, name).parameters()]

        return params(EDGE_LAYERS), params(DISP_LAYERS)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Detached trunk stages x1..x5 (no graph is built through the trunk)."""
        with torch.no_grad():
            return [f.detach() for f in self.trunk.stages(x)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, H, W) -> (edge logit (B, 1, h, w), displacement (B, 2, h, w)) at stride 4."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        x1, x2, x3, x4, x5 = self.features(x)
        e2 = self.edge2(x2)
        ups = [_crop_to(m(f), e2) for m, f in ((self.edge3, x3), (self.edge4, x4), (self.edge5, x5))]
        edge = self.edge6(torch.cat([self.edge1(x1), e2, *ups], dim=1))
        d2, d3 = self.dp2(x2), self.dp3(x3)
        d6 = self.dp6(torch.cat([d3, _crop_to(self.dp4(x4), d3), _crop_to(self.dp5(x5), d3)], dim=1))
        disp = self.dp7(torch.cat([self.dp1(x1), d2, _crop_to(d6, d2)], dim=1))
        return edge, disp

    @torch.no_grad()
    def infer_edge(self, image: torch.Tensor, pad_size: int = 512) -> torch.Tensor:
        """``E_inf`` of §6.8: sigmoid of the flip-averaged edge logits, cropped to the stride-4 feature size.

        ``image`` is one normalised image (3, H, W) or (1, 3, H, W). It is zero-padded at the right and bottom to
        ``pad_size`` x ``pad_size`` and run together with its horizontal flip. Returns (h, w) with
        ``h = (H-1)//4 + 1``, ``w = (W-1)//4 + 1``.
        """
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected one image of shape (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        if pad_size % 16:
            raise ValueError(f"pad_size must be a multiple of 16 (the trunk's output stride), got {pad_size}")
        h_img, w_img = image.shape[-2:]
        if h_img > pad_size or w_img > pad_size:
            raise ValueError(
                f"image is {w_img}x{h_img} but IRN inference pads to {pad_size}x{pad_size}; resize it or raise pad_size"
            )
        x = F.pad(image, (0, pad_size - w_img, 0, pad_size - h_img))
        logit, _ = self(torch.stack([x, x.flip(-1)]))
        logit = logit[0, 0] / 2 + logit[1, 0].flip(-1) / 2
        return torch.sigmoid(logit)[: (h_img - 1) // 4 + 1, : (w_img - 1) // 4 + 1]


def stage_channels(trunk: ResNetTrunk) -> list[int]:
    """Channel counts of x1 (stem) and x2..x5 (layer1..4) of a trunk."""
    info = getattr(trunk.net, "feature_info", None)
    if not info or len(info) != 5:
        raise ValueError("the trunk does not report five stages (stem + layer1..4) in feature_info")
    return [int(f["num_chs"]) for f in info]


@register_family("irn")
def build_irn(arch: dict, num_fg: int) -> EdgeDisplacement:
    """IRN's heads on a ResNet trunk; ``arch = {"backbone": ResNetConfig fields}`` (classes are not needed)."""
    return EdgeDisplacement(ResNetConfig.from_dict(arch["backbone"]))
