"""SEAM: a CAM network at output stride 8 with the pixel correlation module (PCM), §7.1.

The trunk is a ResNet (``wsss.models.resnet``) whose last three stages stand for ResNet-38's ``conv4`` (the last
stride-8 stage before the dilated ones, 512 channels in ResNet-50's layer2), ``conv5`` (layer3, 1024) and
``conv6`` (layer4, the CAM features). The head is Dropout2d and a bias-free 1x1 conv to ``K + 1`` channels
(channel 0 background, the C-channel convention), the CAM ``Y``. The PCM (7.1)-(7.3) revises the detached,
normalised ``Y`` by the affinity of low-level features; both maps are upsampled to the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNetConfig, ResNetTrunk
from .spec import register_family

EPS = 1e-5  # every epsilon of the official PCM
CAM_OUTPUTS = ("pcm", "cam")


def pcm_input(cam: torch.Tensor) -> torch.Tensor:
    """(7.1) ``Y_hat`` from the CAM ``Y`` (B, C, h, w), without gradient: ReLU; ``ReLU(Y - eps) / (max Y + eps)`` per
    channel; background ``1 - max_k Y_hat_k``; among the foreground channels only the per-pixel maximum kept."""
    y = cam.detach().relu()
    peak = y.flatten(2).amax(-1)[..., None, None] + EPS
    y = (y - EPS).relu() / peak
    fg = y[:, 1:]
    top = fg.amax(1, keepdim=True)
    return torch.cat([1 - top, torch.where(fg < top, torch.zeros_like(fg), fg)], dim=1)


def pcm_affinity(f: torch.Tensor) -> torch.Tensor:
    """(7.3) ``S_ij = ReLU(f_i . f_j)`` on per-pixel L2-normalised features ``f / (|f| + eps)``, divided by its column
    sum ``sum_i S_ij + eps``: (B, hw, hw), column ``j`` the weights of pixel ``j``'s average."""
    f = f.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + EPS)
    aff = (f.transpose(1, 2) @ f).relu()
    return aff / (aff.sum(1, keepdim=True) + EPS)


def pcm_propagate(cam_hat: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
    """(7.3) ``y_j = sum_i Y_hat_i S_ij / (sum_i S_ij + eps)``: (B, C, h, w)."""
    return (cam_hat.flatten(2) @ aff).view_as(cam_hat)


def _out_channels(stage: nn.Module) -> int:
    """Channels a residual stage emits: those of its last convolution."""
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class SEAMNet(nn.Module):
    """ResNet trunk, CAM head ``fc8`` and PCM (``f8_3``, ``f8_4``, ``f9`` of the official code), ``K`` foreground
    classes. ``cam_output`` picks the map inference reads: the PCM output (SEAM, §7.1) or the CAM (the baseline)."""

    method = "seam"

    def __init__(self, cnn: ResNetConfig, num_fg: int, pcm_dims: tuple[int, int] = (64, 128), pcm_out: int = 192,
                 dropout: float = 0.5, cam_output: str = "pcm", frozen: tuple[str, ...] = (),
                 bn_affine: bool = True):  # fmt: skip
        super().__init__()
        if cam_output not in CAM_OUTPUTS:
            raise ValueError(f"cam_output must be one of {CAM_OUTPUTS}, got {cam_output!r}")
        self.cam_output = cam_output
        self.cnn = ResNetTrunk(cnn)  # named like CoBra's ResNet, so pretrained_cnn loads it
        net = self.cnn.net
        _freeze(net, frozen, bn_affine)
        c4, c5 = _out_channels(net.layer2), _out_channels(net.layer3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(self.cnn.out_channels, num_fg + 1, 1, bias=False)  # fc8
        self.proj4 = nn.Conv2d(c4, pcm_dims[0], 1, bias=False)  # f8_3 (on conv4)
        self.proj5 = nn.Conv2d(c5, pcm_dims[1], 1, bias=False)  # f8_4 (on conv5)
        self.fuse = nn.Conv2d(3 + sum(pcm_dims), pcm_out, 1, bias=False)  # f9
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.kaiming_normal_(self.proj4.weight)
        nn.init.kaiming_normal_(self.proj5.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CAM ``Y`` and the PCM output ``y`` (B, K + 1, H, W), each upsampled to the input by ``Bil(ac=True)``."""
        *_, conv4, conv5, conv6 = self.cnn.stages(x)
        cam = self.classifier(self.dropout(conv6))
        size = cam.shape[-2:]
        feats = torch.cat(
            [
                F.interpolate(x, size=size, mode="bilinear", align_corners=True),
                self.proj4(conv4.detach()).relu(),
                self.proj5(conv5.detach()).relu(),
            ],
            dim=1,
        )  # (7.2)
        revised = pcm_propagate(pcm_input(cam), pcm_affinity(self.fuse(feats)))
        up = [F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=True) for m in (cam, revised)]
        return up[0], up[1]

    def forward(self, x: torch.Tensor, mode: str = "cam"):
        """``mode="train"``: (Y, y), both (B, K + 1, H, W). ``mode="cam"`` (inference, export): the image logits
        ``GAP(Y)[1:]`` (B, K) and the foreground maps of ``cam_output`` (B, K, H, W) at the input size."""
        cam, revised = self.maps(x)
        if mode == "train":
            return cam, revised
        if mode != "cam":
            raise ValueError(f"mode must be 'cam' or 'train', got {mode!r}")
        chosen = revised if self.cam_output == "pcm" else cam
        return cam[:, 1:].mean((2, 3)), chosen[:, 1:]

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trunk at the base LR, the new layers fc8, f8_3, f8_4, f9 at 10x): the official 4 groups, whose two bias
        groups are empty (no layer has a trainable bias)."""
        heads = [*self.classifier.parameters(), *self.proj4.parameters(), *self.proj5.parameters(),
                 *self.fuse.parameters()]  # fmt: skip
        return list(self.cnn.parameters()), heads


def _freeze(net: nn.Module, frozen: tuple[str, ...], bn_affine: bool) -> None:
    """No gradient into the named trunk modules (SEAM: ``conv1a`` and ``b2*``, i.e. the stem and layer1 of a
    torchvision ResNet) and, with ``bn_affine=False``, into any BatchNorm weight or bias (the official trunk keeps
    BatchNorm in eval mode and untrained)."""
    for name in frozen:
        for p in net.get_submodule(name).parameters():
            p.requires_grad_(False)
    if not bn_affine:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)


@register_family("seam")
def build_seam_net(arch: dict, num_fg: int) -> SEAMNet:
    if "backbone" not in arch:
        raise ValueError("a SEAM architecture needs a 'backbone' section (the ResNet trunk)")
    net = SEAMNet(ResNetConfig.from_dict(arch["backbone"]), num_fg, tuple(arch.get("pcm_dims", (64, 128))),
                  arch.get("pcm_out", 192), arch.get("dropout", 0.5), arch.get("cam_output", "pcm"),
                  tuple(arch.get("frozen", ())), arch.get("bn_affine", True))  # fmt: skip
    stride = output_stride(net)
    if stride != arch.get("output_stride", 8):
        raise ValueError(f"the SEAM trunk has output stride {stride}, the spec says {arch.get('output_stride', 8)}")
    return net


def output_stride(net: SEAMNet) -> int:
    """The trunk's output stride, measured on a 64 x 64 input (strides, dilation and the stem all counted)."""
    with torch.no_grad():
        was = net.training
        out = net.cnn.eval()(torch.zeros(1, 3, 64, 64))
        net.cnn.train(was)
    return 64 // out.shape[-1]
