"""timm ViT backbones: construction from a config and weights from a local file (never from the network)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed
from torch import nn

from .checkpoint import read_state_dict

# Prefixes under which a backbone's tensors may sit in a foreign checkpoint (DDP, our CAM nets, SeCo's student).
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


@dataclass
class BackboneConfig:
    """A timm ViT: a registered architecture name plus optional overrides (empty overrides = the named model)."""

    name: str = "vit_base_patch16_224"
    img_size: int = 224  # size the position embeddings are stored at; any multiple of the patch size runs
    overrides: dict = field(default_factory=dict)  # e.g. {"patch_size": 8, "embed_dim": 192, "depth": 4}
    stem: str = "patch"  # "patch": one strided conv (standard ViT); "conv": stacked 3x3 convs (Xiao et al. 2021)


class ConvStemEmbed(PatchEmbed):
    """Patch embedding by stride-2 3x3 conv-BN-ReLU blocks (log2(patch) of them) and a 1x1 projection.

    "Early convolutions help transformers see better" (Xiao et al., NeurIPS 2021): same token grid and interface
    as ``PatchEmbed``, with an inductive bias that speeds up training from scratch on small data.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        patch, dim = self.patch_size[0], self.proj.out_channels
        if patch & (patch - 1):
            raise ValueError(f"conv stem needs a power-of-two patch size, got {patch}")
        layers, channels = [], self.proj.in_channels
        for i in range(patch.bit_length() - 1):
            width = dim // 2 ** (patch.bit_length() - 2 - i) // 2
            layers += [nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.proj = nn.Sequential(*layers, nn.Conv2d(channels, dim, 1))


def create_vit(cfg: BackboneConfig) -> nn.Module:
    """A headless timm ViT; run it with ``forward_tokens`` to accept any input size."""
    if cfg.stem not in ("patch", "conv"):
        raise ValueError(f"stem must be 'patch' or 'conv', got {cfg.stem!r}")
    extra = {"embed_layer": ConvStemEmbed} if cfg.stem == "conv" else {}
    vit = timm.create_model(
        cfg.name, pretrained=False, num_classes=0, global_pool="", img_size=cfg.img_size, **cfg.overrides, **extra
    )
    if vit.no_embed_class or vit.cls_token is None:
        raise ValueError(f"{cfg.name}: ViTs without a class token or with unembedded prefix tokens are not supported")
    vit.patch_embed.strict_img_size = False
    return vit


def forward_tokens(vit: nn.Module, x: torch.Tensor, aux_index: int | None = None):
    """Tokens of a timm ViT at any input size, as SeCo's encoder computes them (METHODS 1.1).

    The learned patch position grid is resized with bicubic interpolation (``align_corners=False``, no
    antialiasing: exportable to ONNX and TensorRT) at every call; the class-token position is kept.
    Returns the final LayerNorm-ed tokens (B, T, D) and, with ``aux_index``, the output of block ``aux_index``
    before the final norm (SeCo's ``F_aux`` for ``aux_layer=-3`` is ``aux_index=depth-3``), else None.
    """
    h, w = x.shape[-2] // patch_size(vit), x.shape[-1] // patch_size(vit)
    tokens = vit.patch_embed(x)
    n_prefix = vit.num_prefix_tokens
    grid = vit.patch_embed.grid_size
    pos = vit.pos_embed[:, n_prefix:].reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    # Always resample (identity at the native grid): a size test would freeze one branch into exported graphs.
    pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
    pos = torch.cat([vit.pos_embed[:, :n_prefix], pos.flatten(2).transpose(1, 2)], dim=1)
    prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    tokens = vit.pos_drop(torch.cat([*prefix, tokens], dim=1) + pos)
    tokens = vit.norm_pre(tokens)
    aux = None
    for i, block in enumerate(vit.blocks):
        tokens = block(tokens)
        if i == aux_index:
            aux = tokens
    return vit.norm(tokens), aux


def patch_size(vit: nn.Module) -> int:
    return int(vit.patch_embed.patch_size[0])


@dataclass
class LoadReport:
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    resized: list[str]

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors, missing {len(self.missing)}, unexpected {len(self.unexpected)}"
            + (f", resampled {', '.join(self.resized)}" if self.resized else "")
            + (f"\n  missing: {', '.join(self.missing[:8])}" if self.missing else "")
            + (f"\n  unexpected: {', '.join(self.unexpected[:8])}" if self.unexpected else "")
        )


def load_backbone_weights(vit: nn.Module, path: str | Path) -> LoadReport:
    """Load a local timm/torchvision-style state dict (.safetensors, .pth, .bin) into ``vit``.

    Common wrappers (``module.``, ``backbone.``, ``encoder.``, ``model.``) are stripped, classifier heads dropped,
    and position embeddings resampled to the model's grid. Tensors whose shapes still differ are reported as
    missing. Raises ValueError if nothing matches: a wrong file should not pass silently.
    """
    source = {_strip(k): v for k, v in read_state_dict(path).items()}
    target = vit.state_dict()
    loaded, resized, unexpected = {}, [], []
    for key, tensor in source.items():
        if key.startswith(("head.", "fc_norm.", "head_drop.")) and key not in target:
            continue
        if key not in target:
            unexpected.append(key)
            continue
        if key == "pos_embed" and tensor.shape != target[key].shape:
            tensor = _resample_pos_embed(vit, tensor)
            resized.append(key)
        if tensor.shape != target[key].shape:
            unexpected.append(f"{key} {tuple(tensor.shape)} != {tuple(target[key].shape)}")
            continue
        loaded[key] = tensor.to(target[key].dtype)
    if not loaded:
        raise ValueError(f"{path}: no tensor matches the backbone {type(vit).__name__}; is this the right file?")
    vit.load_state_dict(loaded, strict=False)
    missing = [k for k in target if k not in loaded]
    return LoadReport(sorted(loaded), missing, unexpected, resized)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _resample_pos_embed(vit: nn.Module, pos: torch.Tensor) -> torch.Tensor:
    n_prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    return resample_abs_pos_embed(pos, new_size=vit.patch_embed.grid_size, num_prefix_tokens=n_prefix)
