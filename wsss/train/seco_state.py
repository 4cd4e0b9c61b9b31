"""SeCo's training state: EMA teachers, the class prototype bank, the key queue, the loss schedule (§3.5-§3.7,
§3.13)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .precision import float32


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float = 0.999) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter, in one fused pass."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


class PrototypeBank(nn.Module):
    """Class prototypes ``p_k`` (§3.6), updated by EMA from the CLS tokens of single-class images.

    Items are applied as if one at a time in batch order, ``p_c <- mu p_c + (1 - mu) t_i``, then every prototype
    is L2-normalised; the sequential recursion is evaluated in closed form (no loop over items).
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("prototypes", torch.randn(num_classes, dim))

    @torch.no_grad()
    @float32  # a running state: bf16 products would round every update
    def update(self, cls_tokens: torch.Tensor, label_idx: torch.Tensor) -> torch.Tensor:
        """``label_idx`` (N,) holds the class (1..K) of single-class images and -1 otherwise."""
        classes = torch.arange(1, self.prototypes.shape[0] + 1, device=label_idx.device)
        onehot = (label_idx[:, None] == classes).float()  # (N, K), rows of -1 empty (F.one_hot checks on the host)
        later = onehot.flip(0).cumsum(0).flip(0) - onehot  # items of the same class after item i
        n_after = (later * onehot).sum(1)
        weight = (1 - self.momentum) * self.momentum**n_after * onehot.sum(1)  # (N,), 0 for items without a class
        decay = self.momentum ** onehot.sum(0)  # (K,)
        self.prototypes.mul_(decay[:, None]).add_(onehot.t() @ (weight[:, None] * cls_tokens.float()))
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))
        return self.prototypes.clone()


class KeyQueue(nn.Module):
    """The reservoir of teacher keys and their tags (§3.7): a ring buffer overwritten ``n`` rows at a time."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        # random start-up keys normalised along dim 0, as the official code does (quirk Q3.7); all tagged background
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=0))
        self.register_buffer("tags", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, tags: torch.Tensor) -> None:
        size, n = self.keys.shape[0], keys.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the {n} keys added per step")
        rows = (self.ptr + torch.arange(n, device=keys.device)) % size  # no host sync on the pointer
        self.keys[rows] = keys.to(self.keys.dtype)
        self.tags[rows] = tags.to(torch.long)
        self.ptr.copy_((self.ptr + n) % size)


# §3.13: (first iteration at which the term is on, weight); "n > 1000" means from iteration 1001 on.
SCHEDULES = {
    "voc": {"cls": (0, 1.0), "cls_aux": (0, 1.0), "ptc": (0, 0.3), "lig": (1001, 0.5), "lil": (1001, 0.5),
            "seg": (2001, 0.12), "reg": (2001, 0.05)},
    "coco": {"cls": (0, 1.0), "cls_aux": (0, 1.0), "ptc": (8001, 0.2), "lig": (12001, 0.5), "lil": (12001, 0.3),
             "seg": (16001, 0.12), "reg": (16001, 0.05)},
}  # fmt: skip


def loss_weights(step: int, schedule: str | dict = "voc") -> dict[str, float]:
    """Weights of every term of (3.22) at 0-based iteration ``step``; a term that weighs 0 contributes nothing.

    ``schedule`` names a row set of SCHEDULES or maps each term to (first iteration it is on, weight).
    """
    table = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
    return {name: weight if step >= start else 0.0 for name, (start, weight) in table.items()}
