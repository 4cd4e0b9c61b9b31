"""CoBra seeds (METHODS 4.8, 4.9): two max-normalised CAM sources, their fusion and the attention background.

The network's inference output stacks ``[M_cnn (K), A_obj * M_tran (K), A_obj (1)]``; after the multi-scale
flip-summed accumulation (4.17, 4.18) these helpers turn it into one K-channel map and a per-image background
score, and give the IR-label thresholds (4.21).
"""

from __future__ import annotations

import math

import torch

SOURCES = ("cnn", "vit", "avg", "max", "fuse")
NORM_EPS = 1e-5


def split_sources(maps: torch.Tensor, num_fg: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 2K + 1, H, W) -> ``M_cnn`` (B, K, H, W), ``M_tran`` (B, K, H, W), ``A_obj`` (B, H, W)."""
    if maps.shape[1] != 2 * num_fg + 1:
        raise ValueError(f"expected 2K + 1 = {2 * num_fg + 1} CoBra channels, got {maps.shape[1]}")
    return maps[:, :num_fg], maps[:, num_fg : 2 * num_fg], maps[:, 2 * num_fg]


def max_normalize(m: torch.Tensor) -> torch.Tensor:
    """(4.17) per-channel ``M / (max_p M + 1e-5)``; the maps are non-negative, no minimum is subtracted."""
    return m / (m.amax(dim=(-2, -1), keepdim=True) + NORM_EPS)


def fuse(m_cnn: torch.Tensor, m_tran: torch.Tensor, source: str = "fuse") -> torch.Tensor:
    """The seed source (Table 5). ``"fuse"`` is (4.19) ``M_fuse = max((M_cnn + M_tran) / 2, M_tran)``, which
    equals the code's ``(max(M_cnn, M_tran) + M_tran) / 2`` (D14)."""
    if source == "cnn":
        return m_cnn
    if source == "vit":
        return m_tran
    if source == "avg":
        return (m_cnn + m_tran) / 2
    if source == "max":
        return torch.maximum(m_cnn, m_tran)
    if source == "fuse":
        return torch.maximum((m_cnn + m_tran) / 2, m_tran)
    raise ValueError(f"seed source must be one of {SOURCES}, got {source!r}")


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
