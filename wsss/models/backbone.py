"""timm ViT backbones: construction from a config and weights from a local file (never from the network)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed
from torch import nn

from .checkpoint import CheckpointError, read_state_dict
from .report import LoadReport, fit_state

# Prefixes under which a backbone's tensors may sit in a foreign checkpoint (DDP, our CAM nets, SeCo's student).
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
POS_RESIZE = ("size", "dino")


@dataclass
class BackboneConfig:
    """A timm ViT: a registered architecture name plus optional overrides (empty overrides = the named model)."""

    name: str = "vit_base_patch16_224"
    img_size: int = 224  # size the position embeddings are stored at; any input size runs
    overrides: dict = field(default_factory=dict)  # e.g. {"patch_size": 8, "embed_dim": 192, "depth": 4}
    stem: str = "patch"  # "patch": one strided conv (standard ViT); "conv": stacked 3x3 convs (Xiao et al. 2021)
    pos_resize: str = "size"  # position-grid resize rule: "size" (SeCo, §1.1) or "dino" (CoBra's DeiT, §4.4)


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
    if cfg.pos_resize not in POS_RESIZE:
        raise ValueError(f"pos_resize must be one of {POS_RESIZE}, got {cfg.pos_resize!r}")
    extra = {"embed_layer": ConvStemEmbed} if cfg.stem == "conv" else {}
    vit = timm.create_model(
        cfg.name, pretrained=False, num_classes=0, global_pool="", img_size=cfg.img_size, **cfg.overrides, **extra
    )
    if vit.no_embed_class or vit.cls_token is None:
        raise ValueError(f"{cfg.name}: ViTs without a class token or with unembedded prefix tokens are not supported")
    vit.patch_embed.strict_img_size = False
    vit.pos_resize = cfg.pos_resize
    return vit


def forward_tokens(vit: nn.Module, x: torch.Tensor, aux_index: int | None = None):
    """Tokens of a timm ViT at any input size, as the official encoders compute them (§1.1, §4.4).

    The patch embedding floors: rows and columns beyond the last whole patch are dropped, as a stride-p
    convolution does (281 x 500 gives a 17 x 31 grid at p = 16). The learned patch position grid is resized to
    the token grid by ``vit.pos_resize`` (``resize_pos_grid``); the class-token position is kept.

    Returns the final LayerNorm-ed tokens (B, T, D) and, with ``aux_index``, the output of block ``aux_index``
    before the final norm (SeCo's ``F_aux`` for ``aux_layer=-3`` is ``aux_index=depth-3``), else None.
    """
    p = patch_size(vit)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    tokens = vit.patch_embed(x[..., : h * p, : w * p])
    n_prefix = vit.num_prefix_tokens
    pos = resize_pos_grid(vit.pos_embed[:, n_prefix:], vit.patch_embed.grid_size, (h, w), x.shape[-2:],
                          getattr(vit, "pos_resize", "size"))  # fmt: skip
    pos = torch.cat([vit.pos_embed[:, :n_prefix], pos], dim=1)
    prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    tokens = vit.pos_drop(torch.cat([*prefix, tokens], dim=1) + pos)
    tokens = vit.norm_pre(tokens)
    aux = None
    for i, block in enumerate(vit.blocks):
        tokens = block(tokens)
        if i == aux_index:
            aux = tokens
    return vit.norm(tokens), aux


def resize_pos_grid(pos: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], image: tuple[int, int],
                    rule: str = "size") -> torch.Tensor:  # fmt: skip
    """Patch position embeddings (1, g0*g1, D) resized to the ``target`` token grid (1, h*w, D), bicubic.

    * ``"size"`` (SeCo, §1.1): ``Bic(pos; (h, w), ac=False)``, resampled even at the native grid (an identity
      there), so exported graphs keep one branch.
    * ``"dino"`` (CoBra's DeiT, §4.4): kept as is when the token count equals the stored grid's and the *image*
      is square; otherwise ``Bic(pos; scale_factor=((h + 0.1) / g0, (w + 0.1) / g1))``, which maps coordinates by
      that factor rather than by ``h / g0``. Written as two resampling matrices and a tensor condition, so that
      ``torch.export`` keeps both cases and every size (``F.interpolate`` with a scale factor and a Python branch
      would be frozen at the example's size); equal to ``F.interpolate`` within float32 rounding.
    """
    g0, g1 = grid
    h, w = target
    if rule == "size":
        grid_map = pos.reshape(1, g0, g1, -1).permute(0, 3, 1, 2)
        out = F.interpolate(grid_map, size=(h, w), mode="bicubic", align_corners=False)
        return out.flatten(2).transpose(1, 2)
    if g0 != g1 and h * w == g0 * g1 and image[0] == image[1]:
        return pos  # kept as a flat sequence: no per-axis identity exists for a non-square stored grid
    ht, wt, im0, im1 = (torch.scalar_tensor(n, dtype=torch.float32, device=pos.device) for n in (h, w, *image))
    keep = (ht * wt == g0 * g1) & (im0 == im1)  # a tensor, not a Python bool: no branch for torch.export to fix
    m_h = _bicubic_matrix(h, g0, g0 / (ht + 0.1), keep)
    m_w = _bicubic_matrix(w, g1, g1 / (wt + 0.1), keep)
    grid_map = pos.reshape(g0, g1, -1).permute(2, 0, 1)  # (D, g0, g1)
    out = torch.bmm(m_h.expand(grid_map.shape[0], -1, -1), grid_map @ m_w.T)  # (D, h, w)
    return out.flatten(1).T[None]


CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _bicubic_matrix(n_out: int, n_in: int, inv_scale: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): row i holds the bicubic weights (A = -0.75, taps clamped to the border, as PyTorch's
    ``upsample_bicubic2d``) of the source coordinate ``(i + 0.5) * inv_scale - 0.5``, or of ``i`` where ``keep``
    (weights (0, 1, 0, 0): the identity, exactly)."""
    i = torch.arange(n_out, dtype=torch.float32, device=inv_scale.device)
    src = torch.where(keep, i, (i + 0.5) * inv_scale - 0.5)
    base = src.floor()
    t = src - base
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)  # taps floor - 1 .. floor + 2
    taps = (base[:, None] + torch.arange(-1, 3, device=src.device)).clamp(0, n_in - 1)
    onehot = (taps[..., None] == torch.arange(n_in, device=src.device)).to(weights.dtype)  # (n_out, 4, n_in)
    return (weights[..., None] * onehot).sum(1)


def token_map(tokens: torch.Tensor, n_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """ViT tokens (B, T, D) -> the patch-token feature map (B, D, h, w), prefix tokens dropped."""
    return tokens[:, n_prefix:].transpose(1, 2).unflatten(2, grid)


def token_grid(x: torch.Tensor, patch: int) -> tuple[int, int]:
    """The token grid of an input: ``(floor(H / p), floor(W / p))``."""
    return x.shape[-2] // patch, x.shape[-1] // patch


def patch_size(vit: nn.Module) -> int:
    return int(vit.patch_embed.patch_size[0])


def load_backbone_weights(vit: nn.Module, path: str | Path) -> LoadReport:
    """Local timm-style ViT weights (.safetensors, .pth, .bin) into ``vit`` (the timm family filter).

    Common wrappers (``module.``, ``backbone.``, ``encoder.``, ``model.``) are stripped, classifier heads skipped
    and position embeddings resampled to the model's grid. Raises CheckpointError if nothing matches: a wrong
    file should not pass silently.
    """
    source = {_strip(k): v for k, v in read_state_dict(path).items()}
    report = LoadReport(str(path), "timm-vit")
    target = vit.state_dict()
    for key in [k for k in source if k.startswith(("head.", "fc_norm.", "head_drop.")) and k not in target]:
        report.skipped[key] = "classifier head"
        del source[key]
    if "pos_embed" in source and "pos_embed" in target and source["pos_embed"].shape != target["pos_embed"].shape:
        source["pos_embed"] = _resample_pos_embed(vit, source["pos_embed"])
        report.resized.append("pos_embed")
    fitting = fit_state(vit, source, report)
    if not fitting:
        raise CheckpointError(f"{path}: no tensor matches the backbone {type(vit).__name__}; is this the right file?")
    vit.load_state_dict(fitting, strict=False)
    return report


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
