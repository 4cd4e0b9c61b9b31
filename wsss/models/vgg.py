"""A tiny VGG-style trunk (Simonyan & Zisserman 2015): 3x3 convolutions at full resolution before each pooling.

The CPU trunk of the plain CAM on shape-defined classes (issue 20, docs/transfer.md): the tiny ViT's 8 x 8 patch
embedding and the tiny ResNet's stride-4 stem shrink the image before any layer sees an outline, and on a lone shape
in a random colour they barely learn it where two full-resolution 3 x 3 convolutions per stage learn every class in
the same steps (``benchmarks/learnability.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, read_state_dict
from .report import LoadReport, fit_state
from .resnet import ResNetConfig, ResNetTrunk


@dataclass(frozen=True)
class VGGConfig:
    """``stages`` resolutions of ``convs`` 3x3 conv-BN-ReLU each, widths ``width * 2**i``, a 2x max pool after each
    of the first ``pools`` stages. The last ``dilate`` of those pools are dropped and the convolutions after each
    dropped pool dilated by 2 more (DeepLab-LargeFOV on VGG-16): the same weights at output stride
    ``2**(pools - dilate)``, each layer seeing what it saw at the pooled stride.

    ``taps`` > 1 makes a hypercolumn (Hariharan et al. 2015): the last ``taps`` stages' maps (each after its
    convolutions, before its pool), resized bilinearly to the first tapped stage's grid and concatenated, so the
    features keep the finer stage's outline detail at that stage's stride."""

    width: int = 16
    stages: int = 4
    convs: int = 2
    pools: int = 3
    dilate: int = 0
    taps: int = 1

    def __post_init__(self):
        if self.width < 1 or self.stages < 1 or self.convs < 1 or not 0 <= self.pools <= self.stages:
            raise ValueError(f"a VGG trunk needs width, stages, convs >= 1 and 0 <= pools <= stages, got {self}")
        if not 0 <= self.dilate <= self.pools:
            raise ValueError(f"a VGG trunk can dilate 0 to pools ({self.pools}) of its pools, got {self.dilate}")
        if not 1 <= self.taps <= self.stages:
            raise ValueError(f"a VGG trunk taps 1 to stages ({self.stages}) of its stages, got {self.taps}")

    @property
    def output_stride(self) -> int:
        return 2 ** min(self.stages - self.taps, self.pools - self.dilate)

    @property
    def out_channels(self) -> int:
        return sum(self.width * 2**i for i in range(self.stages - self.taps, self.stages))

    @classmethod
    def from_dict(cls, d: dict) -> VGGConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known - {"kind"})
        if unknown:
            raise ValueError(f"unknown VGG trunk settings {unknown}; known: {sorted(known)}")
        return cls(**{k: int(v) for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {"kind": "vgg", **asdict(self)}


class VGGTrunk(nn.Module):
    """(B, 3, H, W) -> (B, out_channels, floor(H / s), floor(W / s)) with ``s = output_stride``."""

    def __init__(self, cfg: VGGConfig):
        super().__init__()
        self.cfg = cfg
        layers, c_in, dilation, self.stage_ends = [], 3, 1, []
        for i in range(cfg.stages):
            c_out = cfg.width * 2**i
            for _ in range(cfg.convs):
                conv = nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False)
                layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(True)]
                c_in = c_out
            self.stage_ends.append(len(layers) - 1)  # the stage's last ReLU, before its pool
            if i < cfg.pools - cfg.dilate:
                layers.append(nn.MaxPool2d(2))
            elif i < cfg.pools:  # a dropped pool keeps its place, so the weights' names do not depend on dilate
                layers.append(nn.Identity())
                dilation *= 2
        self.body = nn.Sequential(*layers)
        self.out_channels = cfg.out_channels

    @property
    def output_stride(self) -> int:
        return self.cfg.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.taps == 1:
            return self.body(x)
        maps = self.forward_stages(x, range(self.cfg.stages - self.cfg.taps, self.cfg.stages))[1]
        size = maps[0].shape[-2:]
        resized = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat([maps[0], *resized], dim=1)

    def forward_stages(self, x: torch.Tensor, stages) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last stage's map and the maps of ``stages`` (0-based; each after its convolutions, before its pool),
        in the order given."""
        ends = [self.stage_ends[i] for i in stages]
        kept = {}
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i in ends:
                kept[i] = x
        return x, [kept[e] for e in ends]


def load_vgg_weights(trunk: VGGTrunk, path: str | Path) -> LoadReport:
    """A VGG trunk's weights (ours: ``body.*``, bare or under ``backbone.`` / ``trunk.`` / ``module.``)."""
    prefixes = ("module.", "backbone.", "trunk.")
    state = {}
    for key, value in read_state_dict(path).items():
        for p in prefixes:
            key = key.removeprefix(p)
        state[key] = value
    report = LoadReport(str(path), "vgg")
    fitting = fit_state(trunk, state, report)
    if not fitting:
        raise CheckpointError(f"{path}: no tensor matches a VGG trunk (body.N.weight); is this the right file?")
    trunk.load_state_dict(fitting, strict=False)
    return report


def cnn_trunk(d: dict) -> VGGTrunk | ResNetTrunk:
    """A CNN branch from its config dict: ``kind: "vgg"`` a VGG trunk, anything else a ResNet (CoBra's CAK)."""
    return VGGTrunk(VGGConfig.from_dict(d)) if d.get("kind") == "vgg" else ResNetTrunk(ResNetConfig.from_dict(d))
