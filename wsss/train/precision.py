"""Mixed precision: what a bf16-autocast training step must still compute in float32."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def float32(fn: F) -> F:
    """Run ``fn`` with autocast off and its floating tensor arguments in at least float32.

    For the quantities a step thresholds, ranks or compares for equality (pseudo-label CAMs, contrast logits): bf16
    keeps 8 mantissa bits, so values near a threshold flip and logits divided by a temperature tie with their row
    maximum. float64 arguments stay float64 (oracles); gradients flow through the casts.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*map(_widen, args), **{k: _widen(v) for k, v in kwargs.items()})

    return run  # type: ignore[return-value]


def _widen(a):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.to(torch.promote_types(a.dtype, torch.float32))
    return a
