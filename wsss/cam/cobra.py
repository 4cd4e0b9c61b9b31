"""CoBra's attention rules (§4.9): the per-image background score (4.20) and the IR-label thresholds (4.21).

The fusion of the two sources (4.19) is part of the one CAM path (``wsss.kernels.cam_postprocess``).
"""

from __future__ import annotations

import math

import torch


def attention_background(a_obj: torch.Tensor, percentile: float) -> torch.Tensor:
    """(4.20) per-image background score ``b = Perc_theta(A_obj)`` over all pixels (linear interpolation, as
    ``np.percentile``), shape (B,)."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return torch.quantile(a_obj.flatten(1).float(), percentile / 100, dim=1)


def ir_thresholds(a_obj, percentile: float = 93.0) -> tuple[float, float]:
    """(4.21) IR-label thresholds from the class-token attention of one image: ``(t_fg, t_bg)``.

    ``t = Perc_93(A_obj)`` as a Python float (float64, the NumPy 1.x behaviour the code was written against);
    ``t_bg`` is the largest multiple of 0.05 strictly below ``t`` computed the code's way (banker's rounding of
    ``20 t``, then a step down when ``t <= rho``), and ``t_fg = t_bg + 0.5``.
    """
    t = float(torch.quantile(torch.as_tensor(a_obj, dtype=torch.float64).flatten(), percentile / 100))
    return _thresholds_from(t)


def _thresholds_from(t: float) -> tuple[float, float]:
    if not math.isfinite(t):
        raise ValueError(f"attention percentile is {t}; the attention map is broken")
    rho = round(20 * t) / 20
    t_bg = rho - 0.05 if t <= rho else rho
    return t_bg + 0.5, t_bg
