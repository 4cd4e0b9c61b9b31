"""The SEAM objective (§7.1): two views, classification, PCM min-pooling, ER and ECR with OHEM, (7.4)-(7.7).

View 1 is the crop ``I``, view 2 ``A(I) = Bil(I; x scale_factor, ac=True)`` (0.3 in the paper). Each view's
network gives the CAM ``Y_v`` and the PCM output ``y_v`` at its input size. The official code's order is kept:
normalise, bring view 1 to view 2's size, mask by ``y_bg = [1, y]``, ER on the foreground, then the background
channel of the CAMs is rewritten and ECR compares each view's PCM output with the other view's one-hot CAM.
``seam.views=1`` with ``seam.weights`` ER/ECR/min at 0 is the baseline: the plain CAM classification loss (7.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
SEAM_DEFAULTS = {
    "scale_factor": 0.3,  # A(I): the second view's downscale
    "ohem": 0.2,  # (7.6) the top fraction of |target - y'| per sample, over all channels
    "min_fraction": 0.25,  # (7.4) the smallest quarter of the per-pixel foreground maximum of y
    "views": 2,  # 1: the baseline, view 1 only (no ER, ECR)
    "weights": {"cls": 1.0, "min": 1.0, "er": 1.0, "ecr": 1.0},  # (7.7): all 1
}


def max_norm(p: torch.Tensor) -> torch.Tensor:
    """``ReLU(p - min - eps) / (max - min + eps)`` per (b, c) after ``ReLU(p)`` (§7.1 maxnorm)."""
    p = p.relu()
    lo, hi = p.amin((2, 3), keepdim=True), p.amax((2, 3), keepdim=True)
    return (p - lo - EPS).relu() / (hi - lo + EPS)


def cls_loss(cam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(7.4) first term, one view: ``MLSM(GAP(Y)[1:], y)``."""
    return F.multilabel_soft_margin_loss(cam[:, 1:].mean((2, 3)), labels)


def min_pool_loss(revised: torch.Tensor, y_bg: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """(7.4) second term, one view: the mean of ``ReLU`` of the ``floor(hw * fraction)`` smallest values of
    ``max_{k>=1} (y * y_bg)_k``."""
    top = (revised * y_bg)[:, 1:].amax(1).flatten(1)
    k = int(top.shape[1] * fraction)
    return top.topk(k, dim=1, largest=False).values.relu().mean()


def er_loss(cam1: torch.Tensor, cam2: torch.Tensor) -> torch.Tensor:
    """(7.5) ``mean |Y'_1[1:] - Y'_2[1:]|``."""
    return (cam1[:, 1:] - cam2[:, 1:]).abs().mean()


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """The background channel set to ``1 - max_{k>=1} Y'_k``."""
    fg = cam[:, 1:]
    return torch.cat([1 - fg.amax(1, keepdim=True), fg], dim=1)


def max_onehot(cam: torch.Tensor) -> torch.Tensor:
    """``onehotmax``: foreground channels below the per-pixel foreground maximum zeroed (ties kept), background as
    is."""
    fg = cam[:, 1:]
    return torch.cat([cam[:, :1], torch.where(fg != fg.amax(1, keepdim=True), torch.zeros_like(fg), fg)], dim=1)


def ohem_l1(target: torch.Tensor, pred: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """One (7.6) term: the mean of the ``floor(C h w fraction)`` largest ``|target - pred|`` of each sample."""
    diff = (target - pred).abs().flatten(1)
    k = int(diff.shape[1] * fraction)
    return diff.topk(k, dim=1).values.mean()


def seam_losses(views: list[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor, s: dict) -> dict:
    """(7.4)-(7.7) from ``[(Y_1, y_1), (Y_2, y_2)]`` (B, C, H_v, W_v) and image labels (B, K): every term, weighted
    by ``s["weights"]``, and their sum ``loss``. One view gives the classification and min terms only."""
    w = s["weights"]
    y_bg = torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1)[..., None, None]
    views = [(cam.float(), rev.float()) for cam, rev in views]
    out = {"cls": sum(cls_loss(cam, labels) for cam, _ in views) / len(views),
           "min": sum(min_pool_loss(rev, y_bg, s["min_fraction"]) for _, rev in views) / len(views)}  # fmt: skip
    if len(views) == 2:
        (cam1, rev1), (cam2, rev2) = views
        size = cam2.shape[-2:]
        cam1, rev1 = (F.interpolate(max_norm(m), size=size, mode="bilinear", align_corners=True) * y_bg
                      for m in (cam1, rev1))  # fmt: skip
        cam2, rev2 = max_norm(cam2) * y_bg, max_norm(rev2) * y_bg
        out["er"] = er_loss(cam1, cam2)
        cam1, cam2 = with_background(cam1), with_background(cam2)
        out["ecr"] = (ohem_l1(max_onehot(cam2.detach()), rev1, s["ohem"])
                      + ohem_l1(max_onehot(cam1.detach()), rev2, s["ohem"]))  # fmt: skip
    out["loss"] = sum(w[name] * value for name, value in out.items())
    return out


class SEAMObjective(nn.Module):
    """(7.7) ``L = L_cls + L_min + L_ER + L_ECR`` on the crop and its ``scale_factor`` rescale."""

    def __init__(self, model: nn.Module, cfg: dict):
        super().__init__()
        self.s = {**SEAM_DEFAULTS, **cfg.get("seam", {})}
        self.s["weights"] = {**SEAM_DEFAULTS["weights"], **self.s["weights"]}
        if self.s["views"] not in (1, 2):
            raise ValueError(f"seam.views must be 1 or 2, got {self.s['views']}")
        if self.s["views"] == 1 and (self.s["weights"]["er"] or self.s["weights"]["ecr"]):
            raise ValueError("seam.views=1 has no second view: set seam.weights.er and seam.weights.ecr to 0")

    def trainable(self) -> list[nn.Parameter]:
        return []

    def forward(self, net: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        x = batch["image"]
        views = [net(x, mode="train")]
        if self.s["views"] == 2:
            size = [int(n * self.s["scale_factor"]) for n in x.shape[-2:]]  # F.interpolate's floor(s * H)
            views.append(net(F.interpolate(x, size=size, mode="bilinear", align_corners=True), mode="train"))
        return seam_losses(views, batch["labels"].float(), self.s)
