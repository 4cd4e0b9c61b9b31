"""Dense CRF refinement with pydensecrf (§5); CPU-bound, so run over a process pool by the callers.

pydensecrf is imported when a CRF first runs, so every other path (PAR, no refinement, training) works on a machine
where it could not be built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

INSTALL_HINT = "the dense CRF needs pydensecrf: pip install pydensecrf2 (or refine with --refine par / none)"


def _pydensecrf():
    """The ``pydensecrf.densecrf`` and ``pydensecrf.utils`` modules, or a one-line error saying how to get them."""
    try:
        return importlib.import_module("pydensecrf.densecrf"), importlib.import_module("pydensecrf.utils")
    except ImportError as err:
        raise RuntimeError(f"{INSTALL_HINT} ({err})") from err


@dataclass(frozen=True)
class CRFParams:
    """Potts kernels of a fully connected CRF: Gaussian (sxy, compat) and bilateral (sxy, srgb, compat)."""

    gauss_sxy: float
    gauss_compat: float
    bi_sxy: float
    bi_srgb: float
    bi_compat: float
    iterations: int = 10
    gt_prob: float = 0.7  # confidence of a label unary (rows C, D)


# Rows of §5.3.
CRF_PRESETS = {
    "seg": CRFParams(1, 1, 121, 5, 4),  # A: SeCo/ToCo final segmentation, softmax unary
    "seed": CRFParams(3, 3, 50, 5, 10),  # C: IRN/CoBra/SeCo label CRF on CAM seeds
    "cobra": CRFParams(2, 3, 45, 5, 4),  # D: CoBra final masks
}


def dense_crf(image: np.ndarray, unary: np.ndarray, params: CRFParams) -> np.ndarray:
    """Mean-field inference (5.2) on an (L, H*W) float32 unary; returns (L, H, W) marginals."""
    h, w = image.shape[:2]
    n_labels = unary.shape[0]
    dcrf, _ = _pydensecrf()
    crf = dcrf.DenseCRF2D(w, h, n_labels)  # width first
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bi_sxy, srgb=params.bi_srgb, rgbim=np.require(image, np.uint8, ["C", "W"]),
        compat=params.bi_compat,
    )  # fmt: skip
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def crf_from_probs(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRF_PRESETS["seg"]) -> np.ndarray:
    """Argmax of a CRF with unary ``-log(clip(P, 1e-5))`` (5.3); ``probs`` is (L, H, W)."""
    unary = _pydensecrf()[1].unary_from_softmax(np.ascontiguousarray(probs, dtype=np.float32), clip=1e-5)
    return dense_crf(image, unary, params).argmax(0)


def crf_from_labels(image: np.ndarray, label: np.ndarray, keys: np.ndarray, params: CRFParams) -> np.ndarray:
    """Label CRF (5.4): ``label`` (H, W) holds ids from ``keys``; returns refined ids (uint8).

    Labels are compressed to indices into ``keys`` (quirk Q5.3) so the CRF only sees the image's own classes;
    pixels with an id outside ``keys`` (for example 255) get an uninformative unary.
    """
    lut = np.zeros(256, np.int64)
    lut[keys] = np.arange(1, len(keys) + 1)  # 0 = "unsure" for unary_from_labels(zero_unsure=True)
    idx = lut[label]
    if len(keys) == 1:
        return np.full(label.shape, keys[0], np.uint8)
    unary = _pydensecrf()[1].unary_from_labels(idx, len(keys), gt_prob=params.gt_prob, zero_unsure=True)
    q = dense_crf(image, unary, params)
    return keys[q.argmax(0)].astype(np.uint8)


def refine_seed_crf(image: np.ndarray, seed: np.ndarray, tags: np.ndarray, preset: str = "seed") -> np.ndarray:
    """Dense-CRF mask from a seed (§5.3 row C): labels restricted to background + the image's tags."""
    keys = np.concatenate([[0], np.flatnonzero(tags) + 1]).astype(np.int64)
    return crf_from_labels(image, seed, keys, CRF_PRESETS[preset])
