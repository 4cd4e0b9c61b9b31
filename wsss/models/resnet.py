"""ResNet trunks for CoBra's CNN branch and IRN (§4.3, §6.4): timm ResNets with IRN's stride rules.

``strides`` are those of layer1..4 after the stride-4 stem; IRN/CoBra use (1, 2, 2, 1) there, i.e. the
"(2, 2, 2, 1)" of the official code counted from conv1, output stride 16 without dilation. ``fixed_bn`` keeps
BatchNorm on its running statistics in training too (FixedBatchNorm: affine weights still train);
``frozen_stages`` stops gradients into the stem (1) or the stem and layer1..k-1 (k), as the official code does
with ``requires_grad=False`` on conv1/bn1 and a detached stage-2 output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from .checkpoint import read_state_dict
from .report import LoadReport, fit_state


@dataclass(frozen=True)
class ResNetConfig:
    name: str = "resnet152"  # a timm ResNet name, or "custom" with ``layers``/``channels``/``block``
    strides: tuple[int, ...] = (1, 2, 2, 1)
    fixed_bn: bool = True
    frozen_stages: int = 2  # 0: all train; 1: stem frozen; 2: stem frozen, layer2 output detached (CoBra/IRN)
    layers: tuple[int, ...] = (1, 1, 1, 1)
    channels: tuple[int, ...] = (32, 64, 128, 256)
    block: str = "basic"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> ResNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class FixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics; gamma/beta stay trainable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def create_resnet(cfg: ResNetConfig) -> ResNet:
    """A headless timm ResNet with the configured strides and BatchNorm kind."""
    norm = FixedBatchNorm2d if cfg.fixed_bn else nn.BatchNorm2d
    if cfg.name == "custom":
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[cfg.block]
        net = ResNet(
            block, cfg.layers, num_classes=0, global_pool="", channels=cfg.channels, norm_layer=norm, **cfg.extra
        )
    else:
        net = timm.create_model(cfg.name, num_classes=0, global_pool="", norm_layer=norm, **cfg.extra)
    for layer, stride in zip((net.layer1, net.layer2, net.layer3, net.layer4), cfg.strides, strict=True):
        _set_stride(layer[0], stride)
    return net


def _set_stride(block: nn.Module, stride: int) -> None:
    """The stride of a residual stage lives in its first block's strided conv and its downsample conv."""
    conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


class ResNetTrunk(nn.Module):
    """Stage outputs x1 (stem, /4), x2..x5 (layer1..4) of a ResNet, with CoBra/IRN freezing rules."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        self.net = create_resnet(cfg)
        if cfg.frozen_stages >= 1:
            for p in [*self.net.conv1.parameters(), *self.net.bn1.parameters()]:
                p.requires_grad_(False)

    @property
    def out_channels(self) -> int:
        return self.net.num_features

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x1 = n.maxpool(n.act1(n.bn1(n.conv1(x))))
        feats = [x1]
        for k, layer in enumerate((n.layer1, n.layer2, n.layer3, n.layer4), start=2):
            x = layer(feats[-1])
            if k == 3 and self.cfg.frozen_stages >= 2:  # no gradient into conv1..layer2
                x = x.detach()
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[-1]


def load_resnet_weights(trunk: ResNetTrunk, path: str | Path) -> LoadReport:
    """torchvision / timm ResNet weights (same key names) from a local file; the classifier ``fc`` is skipped."""
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    report = LoadReport(str(path), "torchvision-resnet")
    for key in [k for k in state if k.startswith("fc.")]:
        report.skipped[key] = "classifier head"
        del state[key]
    trunk.net.load_state_dict(fit_state(trunk.net, state, report), strict=False)
    return report
