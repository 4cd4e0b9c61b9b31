"""COCO-style run-length encoding of label maps (uncompressed RLE: column-major runs, zeros first)."""

from __future__ import annotations

import numpy as np


def rle_encode(mask: np.ndarray) -> dict:
    """Binary (H, W) mask -> ``{"size": [H, W], "counts": [...]}`` as pycocotools' ``frPyObjects`` reads it."""
    flat = np.asfortranarray(mask.astype(bool)).ravel(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[False], flat, [False]]).astype(np.int8)))
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    counts = runs[:-1] if change.size and change[-1] == flat.size else runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), bool)
    values[1::2] = True
    return np.repeat(values, rle["counts"]).reshape(w, h).T if rle["counts"] else np.zeros((h, w), bool)


def encode_label_map(label: np.ndarray, class_names) -> list[dict]:
    """One COCO annotation per foreground class present (background and 255 skipped)."""
    segments = []
    for c in np.unique(label):
        if c == 0 or c == 255:
            continue
        mask = label == c
        ys, xs = np.nonzero(mask)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        segments.append({"category_id": int(c), "category": class_names[int(c)], "segmentation": rle_encode(mask),
                         "area": int(mask.sum()), "bbox": bbox})  # fmt: skip
    return segments
