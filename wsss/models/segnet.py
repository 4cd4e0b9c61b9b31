"""The final segmentation networks trained on pseudo-masks: DeepLabV2 on a ResNet, SegFormer on a MiT encoder.

``segment(x)`` (and ``forward``) maps a normalised (B, 3, H, W) batch to logits (B, C, h, w) at the network's
output stride, background in channel 0, the interface of SeCo's decoder (``SeCoNet.segment``), so that the §3.15
inference protocol (``wsss.cam.seg``) and ``wsss-export --what seg`` serve every segmentation network alike.

* ``kind="deeplabv2"``: a timm ResNet (torchvision's layout and key names: ``resnet101`` loads torchvision's
  ``resnet101-63fe2227.pth``) at output stride 8 (layer3 and layer4 dilated by 2 and 4), BatchNorm frozen
  (statistics and affine, as Caffe's DeepLabV2 trains), then the ASPP of four 3x3 branches at rates 6/12/18/24,
  summed (``wsss.models.seco.ASPP``).
* ``kind="segformer"``: ``segmentation_models_pytorch``'s SegFormer (MiT encoder, all-MLP decoder) with logits at
  stride 4. Inputs are zero-padded to a multiple of 32 (the encoder's stride) and the logits cropped back.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import read_state_dict
from .report import LoadReport, fit_state
from .resnet import FixedBatchNorm2d, ResNetConfig, ResNetTrunk, load_resnet_weights
from .seco import ASPP
from .spec import register_family

SEGNET_KINDS = ("deeplabv2", "segformer")


class DeepLabV2(nn.Module):
    """ResNet at output stride ``output_stride`` -> ASPP (summed dilated 3x3 branches) -> C logits."""

    def __init__(self, backbone: ResNetConfig, num_classes: int, rates: tuple[int, ...], freeze_bn: bool = True):
        super().__init__()
        self.backbone = ResNetTrunk(backbone)
        self.head = ASPP(self.backbone.out_channels, num_classes, tuple(rates))
        for conv in self.head.children():  # N(0, 0.01) weights, zero biases (DeepLab's Caffe prototxt)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, FixedBatchNorm2d):
                    m.requires_grad_(False)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment(x)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, ASPP): the ASPP trains at ``head_lr`` times the base rate."""
        return list(self.backbone.parameters()), list(self.head.parameters())


class SegFormer(nn.Module):
    """smp's SegFormer: ``backbone`` the MiT encoder, ``head`` the MLP decoder and its 1x1 classifier."""

    # torch.export cannot prove the shape guards on the grids of the padded input for all sizes, though they hold
    # (the crop's bounds, stride orders of one-cell grids): its ONNX export frees sizes with hints (wsss.export.onnx)
    size_guards_unprovable = True

    def __init__(self, encoder: str, num_classes: int, decoder_channels: int = 256):
        super().__init__()
        import segmentation_models_pytorch as smp

        net = smp.Segformer(encoder_name=encoder, encoder_weights=None, classes=num_classes, upsampling=1,
                            decoder_segmentation_channels=decoder_channels)  # fmt: skip
        self.backbone = net.encoder
        self.head = nn.ModuleDict({"decoder": net.decoder, "classifier": net.segmentation_head})
        self.stride = int(net.encoder.output_stride)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.stride, 0, (-h) % self.stride))
        # smp's encoder output without its empty stride-2 placeholder made by torch.empty, which torch.export
        # cannot size symbolically; the decoder only reads the placeholder's (zero) channel count
        features = [x, x[:, :0], *self.backbone.forward_features(x)]
        logits = self.head["classifier"](self.head["decoder"](features))
        # the stride-4 cells that cover the unpadded image; (n + 3) // 4 for ceil(n / 4): an exported -(-n // 4)
        # runs as truncating division in ONNX
        return logits[..., : (h + 3) // 4, : (w + 3) // 4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment(x)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return list(self.backbone.parameters()), list(self.head.parameters())


SegNet = DeepLabV2 | SegFormer


@register_family("segnet")
def build_segnet(arch: dict, num_fg: int) -> nn.Module:
    kind = arch.get("kind")
    if kind == "deeplabv2":
        rates = tuple(arch.get("rates", (6, 12, 18, 24)))
        return DeepLabV2(ResNetConfig.from_dict(arch["backbone"]), num_fg + 1, rates, arch.get("freeze_bn", True))
    if kind == "segformer":
        return SegFormer(arch["backbone"]["name"], num_fg + 1, arch.get("decoder_channels", 256))
    raise ValueError(f"segnet kind must be one of {SEGNET_KINDS}, got {kind!r}")


def load_segnet_backbone(model: nn.Module, path: str | Path) -> LoadReport:
    """Local ImageNet weights into a segmentation network's encoder: torchvision / timm ResNet files for DeepLab,
    the SegFormer authors' MiT files (``mit_b2.pth``, same key names as smp's encoder) for SegFormer."""
    if isinstance(model, DeepLabV2):
        return load_resnet_weights(model.backbone, path)
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    report = LoadReport(str(path), "mit")
    for key in [k for k in state if k.startswith("head.")]:
        report.skipped[key] = "classifier head"
        del state[key]
    # nn.Module's loader: smp's encoder overrides load_state_dict without ``strict``
    nn.Module.load_state_dict(model.backbone, fit_state(model.backbone, state, report), strict=False)
    return report
