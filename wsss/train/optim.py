"""PolyWarmupAdamW (§3.14): AdamW with linear warm-up by ratio, then polynomial decay."""

from __future__ import annotations

import torch
from torch import nn


def poly_warmup_factor(step: int, total: int, warmup: int, warmup_ratio: float, power: float) -> float:
    """(3.23) ``1 - (1 - t/T_w)(1 - r)`` for ``t < T_w``; (3.24) ``(1 - t/T)^power`` after (not shifted)."""
    if step < warmup:
        return 1 - (1 - step / warmup) * (1 - warmup_ratio)
    return max(1 - step / total, 0.0) ** power


class _PolySchedule:
    """Mixin before a torch optimizer: each step first sets every group's lr to ``base_lr * poly_warmup_factor``."""

    def _start_schedule(self, total: int, warmup: int, warmup_ratio: float, power: float) -> None:
        self.schedule = (total, warmup, warmup_ratio, power)
        for g in self.param_groups:
            g.setdefault("base_lr", g["lr"])
        self.global_step = 0

    def step(self, closure=None):
        factor = poly_warmup_factor(self.global_step, *self.schedule)
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.global_step += 1
        return super().step(closure)  # the optimizer after the mixin in the MRO


class PolyWarmupAdamW(_PolySchedule, torch.optim.AdamW):
    """AdamW over parameter groups whose base learning rates follow ``poly_warmup_factor``."""

    def __init__(self, groups: list[dict], total: int, warmup: int, warmup_ratio: float, power: float, **kw):
        super().__init__(groups, betas=(0.9, 0.999), eps=1e-8, **kw)
        self._start_schedule(total, warmup, warmup_ratio, power)


def param_groups(backbone: list[nn.Parameter], heads: list[nn.Parameter], lr: float, head_lr: float) -> list[dict]:
    """SeCo's groups: backbone weights, backbone norms at ``lr``; heads at ``head_lr * lr`` (frozen ones dropped)."""
    return [
        {"params": [p for p in backbone if p.requires_grad], "lr": lr},
        {"params": [p for p in heads if p.requires_grad], "lr": lr * head_lr},
    ]


class PolySGD(_PolySchedule, torch.optim.SGD):
    """IRN/CoBra's PolyOptimizer (§4.7): SGD whose group learning rates decay as ``lr (1 - t/T)^power``.

    The official code passes its weight decay where SGD expects the momentum, so its effective momentum is
    1e-4 (quirk Q4.3); ``momentum`` is explicit here and the CoBra configs set that value.
    """

    def __init__(self, groups: list[dict], total: int, power: float, momentum: float, weight_decay: float):
        super().__init__(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)
        self._start_schedule(total, 0, 1.0, power)


def make_optimizer(groups: list[dict], ocfg: dict, total: int) -> torch.optim.Optimizer:
    """``optim.name``: ``"adamw"`` (SeCo's PolyWarmupAdamW, the default) or ``"sgd"`` (CoBra/IRN PolySGD)."""
    name = ocfg.get("name", "adamw")
    if name == "adamw":
        return PolyWarmupAdamW(groups, total, ocfg["warmup"], ocfg["warmup_ratio"], ocfg["power"],
                               weight_decay=ocfg["weight_decay"])  # fmt: skip
    if name == "sgd":
        return PolySGD(groups, total, ocfg["power"], ocfg["momentum"], ocfg["weight_decay"])
    raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {name!r}")
