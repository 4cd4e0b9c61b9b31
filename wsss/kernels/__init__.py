"""Fused Triton kernels, each beside its plain PyTorch reference (a leaf package: it imports nothing from ``wsss``).

* ``patch_infonce``: CoBra's top-k patch InfoNCE for CAP and SAP (§4.5, §4.6, D2), forward and backward.
* ``masked_ptc``: SeCo's masked patch-token contrast (§3.10), forward and backward.
* ``cam_postprocess``: multi-scale/flip CAM merge, normalisation, CoBra fusion and labels in one pass (§1.3,
  §4.8, §4.9), inference only.

Each public function takes ``backend="triton" | "torch" | None``; None picks Triton for CUDA tensors when triton
imports (``wsss.kernels.dispatch``; the environment variable ``WSSS_KERNELS`` overrides). The ``*_reference``
functions are the vectorised PyTorch paths, used on CPU and as the correctness oracles.
"""

from .cam_post import NORM_EPS, cam_postprocess, cam_postprocess_reference, combine_sources, normalize_maps
from .dispatch import backend_for, triton_available
from .infonce import patch_infonce, patch_infonce_reference
from .ptc import masked_ptc, masked_ptc_reference, pair_counts

__all__ = [
    "NORM_EPS",
    "backend_for",
    "cam_postprocess",
    "cam_postprocess_reference",
    "combine_sources",
    "normalize_maps",
    "masked_ptc",
    "masked_ptc_reference",
    "pair_counts",
    "patch_infonce",
    "patch_infonce_reference",
    "triton_available",
]
