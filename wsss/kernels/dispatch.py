"""Backend choice for the fused kernels: Triton on CUDA tensors, the PyTorch reference everywhere else.

Order of precedence: an explicit ``backend=`` argument, then the environment variable ``WSSS_KERNELS``
(``torch``: always the reference; ``triton``: Triton even for CPU tensors, which runs only under the Triton
interpreter, ``TRITON_INTERPRET=1``; ``auto`` or unset: automatic), then the automatic rule: Triton when every
tensor is on a CUDA device and ``triton`` imports.

``triton`` is imported lazily and guarded, so ``wsss.kernels`` works on machines without it.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

BACKENDS = ("triton", "torch")
ENV_VAR = "WSSS_KERNELS"


@functools.cache
def triton_module() -> ModuleType | None:
    """The ``triton`` package, or None when it cannot be imported."""
    try:
        import triton
        import triton.language  # noqa: F401  (the kernels need the language module too)
    except ImportError:
        return None
    return triton


def triton_available() -> bool:
    """True when ``triton`` imports."""
    return triton_module() is not None


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is switched on (``TRITON_INTERPRET=1``), which runs kernels on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def backend_for(*tensors: torch.Tensor, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for a kernel call on ``tensors`` (see the module docstring for the rules).

    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` when Triton is requested but cannot run
    (not installed, or CPU tensors without the interpreter).
    """
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in (*BACKENDS, "auto"):
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of 'triton', 'torch' or 'auto', got {choice!r}")
    if choice == "torch":
        return "torch"
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("the Triton backend was requested but `import triton` fails; use backend='torch'")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 (the Triton interpreter, for tests on "
            "CPU) set before wsss.kernels is imported"
        )
    return "triton"
