"""Pictures people would rather look at than read: label overlays and image | seed | mask | GT strips."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..data.datasets import Sample
from ..data.palette import colorize


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the palette colours of ``label`` over ``image`` (background left as is)."""
    colour = colorize(label).astype(np.float32)
    blend = np.where((label > 0)[..., None], (1 - alpha) * image + alpha * colour, image)
    return blend.astype(np.uint8)


def save_overlay(path: Path, sample: Sample, seed: np.ndarray, mask: np.ndarray | None) -> None:
    """One strip: image | seed overlay | CRF mask overlay | ground truth (where available)."""
    panels = [sample.image, overlay(sample.image, seed)]
    if mask is not None:
        panels.append(overlay(sample.image, mask))
    if sample.mask is not None:
        panels.append(colorize(sample.mask))
    strip = np.concatenate([np.pad(p, ((0, 0), (0, 2), (0, 0)), constant_values=255) for p in panels], 1)
    zoom = max(1, 256 // strip.shape[0])  # small images are enlarged (nearest) to be legible
    strip = cv2.resize(strip, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), np.ascontiguousarray(strip[..., ::-1]))
