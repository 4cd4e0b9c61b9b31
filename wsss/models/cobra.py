"""CoBra: a CNN (class-aware, CAK) and a ViT (semantic-aware, SAK) branch trained together (§4.3, §4.4).

Both branches produce ``K + 1`` CAM channels (channel 0 is background) on their own grids (equal at training
crops that are multiples of the patch size, e.g. 224; at 281 x 500 the ResNet gives 18 x 32 and the ViT 17 x 31),
a projection for
the patch contrast, and the ViT gives its layer-summed attention: the patch affinity ``P`` and the class-token
attention ``A_obj`` that weights its CAMs at inference and sets the background threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneConfig, create_vit, forward_tokens, patch_size, token_grid, token_map
from .spec import register_family
from .vgg import cnn_trunk


@dataclass
class CoBraOutputs:
    """One forward pass of both branches; maps are (B, C, h, w), C = K + 1, each on its branch's grid."""

    m_cnn: torch.Tensor  # (4.1) M_cnn = W_c * F_cnn
    m_tran: torch.Tensor  # (4.2) M_tran = W_t * T
    f_cnn: torch.Tensor  # CNN features F_cnn (B, C_cnn, h, w): 2048 for ResNet-152, 128 for the tiny VGG
    tokens: torch.Tensor  # ViT patch-token map T (B, D, h, w)
    attn: torch.Tensor  # (4.3) A_bar = sum_l mean_heads A_l, (B, 1 + hw, 1 + hw)

    @property
    def affinity(self) -> torch.Tensor:
        """(4.4) patch-to-patch affinity ``P = A_bar[1:, 1:]`` (B, hw, hw)."""
        return self.attn[:, 1:, 1:]

    @property
    def a_obj(self) -> torch.Tensor:
        """(4.4) semantic-agnostic class-token attention ``A_obj = A_bar[0, 1:]`` as a (B, h, w) map."""
        return self.attn[:, 0, 1:].unflatten(1, self.m_tran.shape[-2:])


class AttentionRecorder:
    """Collects every block's attention probabilities (B, heads, T, T) through timm's public module hooks.

    Fused attention never materialises the probabilities, so it is switched off on the recorded blocks; each
    block's ``attn.attn_drop`` then receives them as input.
    """

    def __init__(self, vit: nn.Module):
        self.total: torch.Tensor | None = None
        for block in vit.blocks:
            block.attn.fused_attn = False
            block.attn.attn_drop.register_forward_hook(lambda _m, args, _out: self._add(args[0]))

    def _add(self, attn: torch.Tensor) -> None:
        """Accumulate the head mean as each block runs: only one (B, T, T) sum is held, not every layer's
        (B, heads, T, T) map (at native VOC sizes and scale 2, 12 layers of those took about 9 GB)."""
        mean = attn.mean(1)
        self.total = mean if self.total is None else self.total + mean

    def take_sum(self) -> torch.Tensor:
        """(4.3): heads averaged, layers summed (D8: keeps the scale the percentile thresholds expect)."""
        total, self.total = self.total, None
        return total


POOLINGS = ("gap", "gmp")


def image_logits(m: torch.Tensor, pooling: str = "gap") -> torch.Tensor:
    """(4.6) image logits (B, K) of a 21-channel CAM: GAP over the foreground channels, as the paper and code do.
    ``"gmp"`` takes each map's spatial max instead: an experiment (see the README), not CoBra's design."""
    fg = m[:, 1:]
    return fg.mean((2, 3)) if pooling == "gap" else fg.amax((2, 3))


class CoBraNet(nn.Module):
    """Two branches, ``K`` foreground classes; the CNN's output stride must equal the ViT patch size."""

    method = "cobra"

    def __init__(self, cnn: dict, vit: BackboneConfig, num_fg: int, proj_dim: int = 256, pooling: str = "gap"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.cnn = cnn_trunk(cnn)  # the paper's ResNet, or a VGG trunk ({"kind": "vgg", ...}) on small data
        self.backbone = create_vit(vit)  # named like the other networks' ViT so --pretrained loads it
        self.patch_size = patch_size(self.backbone)
        self.num_fg = num_fg
        c, d = self.cnn.out_channels, self.backbone.embed_dim
        self.cnn_classifier = nn.Conv2d(c, num_fg + 1, 1, bias=False)  # W_c, channel 0 = background
        self.cnn_proj = nn.Conv2d(c, proj_dim, 1, bias=False)  # P_c (CAP)
        self.vit_classifier = nn.Conv2d(d, num_fg + 1, 3, padding=1)  # W_t, TS-CAM's 3x3 head
        self.vit_proj = nn.Conv2d(d, proj_dim, 1, bias=False)  # P_t (SAP)
        self._recorder = AttentionRecorder(self.backbone)

    def branches(self, x: torch.Tensor) -> CoBraOutputs:
        f_cnn = self.cnn(x)
        tokens, _ = forward_tokens(self.backbone, x)
        tokens = token_map(tokens, self.backbone.num_prefix_tokens, token_grid(x, self.patch_size))
        attn = self._recorder.take_sum()
        return CoBraOutputs(self.cnn_classifier(f_cnn), self.vit_classifier(tokens), f_cnn, tokens, attn)

    def projections(self, out: CoBraOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised patch embeddings ``v^c = P_c * F_cnn`` and ``v^s = P_t * T``, each (B, hw, dim)."""
        v_c = F.normalize(self.cnn_proj(out.f_cnn).flatten(2).transpose(1, 2), dim=-1)
        v_s = F.normalize(self.vit_proj(out.tokens).flatten(2).transpose(1, 2), dim=-1)
        return v_c, v_s

    def forward(self, x: torch.Tensor, mode: str = "cam"):
        """``mode="train"``: (CoBraOutputs, v^c, v^s). ``mode="cam"`` (inference, export): image logits (B, K),
        the CNN CAM ``M_cnn`` (B, K, h_c, w_c) and the ViT maps (B, K + 1, h_t, w_t) (§4.8).

        The ViT maps are the CAM weighted by the class-token attention ``A_obj * M_tran`` (4.5) in ``[:K]`` and
        ``A_obj`` in ``[K]``. All are foreground-only and pre-ReLU; the CAM path applies the ReLU on these grids,
        before upsampling, as the official code does. Logits average the two branches'.
        """
        out = self.branches(x)
        if mode == "train":
            if out.m_cnn.shape[-2:] != out.m_tran.shape[-2:]:
                raise ValueError(f"CNN grid {tuple(out.m_cnn.shape[-2:])} != ViT grid {tuple(out.m_tran.shape[-2:])}"
                                 f": train at crops that are multiples of the patch size {self.patch_size}, with the "
                                 "ResNet's output stride equal to it")  # fmt: skip
            return (out, *self.projections(out))
        if mode != "cam":
            raise ValueError(f"mode must be 'cam' or 'train', got {mode!r}")
        a_obj = out.a_obj[:, None]
        logits = (image_logits(out.m_cnn, self.pooling) + image_logits(out.m_tran, self.pooling)) / 2
        return logits, out.m_cnn[:, 1:], torch.cat([a_obj * out.m_tran[:, 1:], a_obj], dim=1)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trunks at the base LR, heads at 10x: W_c, W_t and both projections; §4.7, D13)."""
        heads = [*self.cnn_classifier.parameters(), *self.cnn_proj.parameters(), *self.vit_classifier.parameters(),
                 *self.vit_proj.parameters()]  # fmt: skip
        return [*self.cnn.parameters(), *self.backbone.parameters()], heads


@register_family("cobra")
def build_cobra_net(arch: dict, num_fg: int) -> CoBraNet:
    if "cnn" not in arch:
        raise ValueError("a CoBra architecture needs a 'cnn' section (the ResNet branch)")
    return CoBraNet(arch["cnn"], BackboneConfig(**arch["backbone"]), num_fg,
                    arch.get("proj_dim", 256), arch.get("pooling", "gap"))  # fmt: skip
