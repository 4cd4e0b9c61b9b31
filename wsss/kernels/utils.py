"""Helpers shared by the kernels: input range checks without host syncs, launch checks, autotuning, grid limits."""

from __future__ import annotations

import torch

from .dispatch import interpreter_enabled, triton_module

MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's grid limits per axis: put large dimensions on axis 0


def check_range(name: str, t: torch.Tensor, low: int, high: int, error: type[Exception] = IndexError) -> None:
    """Require ``low <= t < high`` on every device without a host sync.

    On the CPU the check is free and raises ``error`` at once. On a GPU it is queued with ``torch._assert_async``
    (no host sync): a failure is a device-side assert, which surfaces as a ``RuntimeError`` ("device-side assert
    triggered") from the next CUDA call after it fires, at the latest the next synchronisation, and leaves the CUDA
    context unusable; the kernels queued after it never run, so nothing is read or written out of bounds.
    """
    message = f"{name} holds values outside [{low}, {high})"
    if t.numel() == 0:
        return
    lo, hi = t.aminmax()
    if t.device.type == "cpu":
        if lo < low or hi >= high:
            raise error(message)
    else:
        torch._assert_async((lo >= low) & (hi < high), message)


def check_launch(kernel: object, *tensors: torch.Tensor) -> None:
    """Raise a clear error before launching a compiled (non-interpreted) Triton kernel on CPU tensors.

    ``triton.jit`` picks the interpreter when the kernel is defined, i.e. when ``wsss.kernels`` is imported, so
    setting ``TRITON_INTERPRET=1`` afterwards is too late.
    """
    while type(kernel).__name__ == "Autotuner":
        kernel = kernel.fn
    if not all(t.is_cuda for t in tensors) and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "Triton kernels were compiled for the GPU but got CPU tensors; set TRITON_INTERPRET=1 before "
            "importing wsss.kernels to run them in the interpreter"
        )


def check_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid`` itself, or a ``ValueError`` naming the axis beyond CUDA's limit (not a launch that fails later)."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if size > limit:
            raise ValueError(f"Triton grid {grid}: axis {axis} has {size} programs, more than CUDA's {limit}")
    return grid


def autotune(configs: list, key: list[str], **kwargs):
    """``triton.autotune`` over ``configs`` keyed on the named problem sizes (and the tensors' dtypes).

    Under the interpreter only the first config is kept: it runs one program at a time on the CPU, so timing the
    others would only slow the tests down. Every kernel tuned here gives the same bits with every config (the
    tests check it): tuned parameters never change a summation order.
    """
    triton = triton_module()
    return triton.autotune(configs[:1] if interpreter_enabled() else configs, key=key, **kwargs)
