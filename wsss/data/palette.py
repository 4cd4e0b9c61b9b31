"""Class lists, the PASCAL VOC palette and label PNG IO (8-bit palette PNGs, 255 = ignore)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
VOID_RGB = (224, 224, 192)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# COCO 2014 in SeCo's VOC-style layout: ids 1..80 follow the COCO category order.
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def voc_palette() -> np.ndarray:
    """The (256, 3) uint8 VOC colour map: bit-interleaved ids, with 255 mapped to the void colour."""
    ids = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.uint8)
    for j in range(8):  # bit 3j of c -> bit 7-j of R, 3j+1 -> G, 3j+2 -> B
        for ch in range(3):
            pal[:, ch] |= (((ids >> (3 * j + ch)) & 1) << (7 - j)).astype(np.uint8)
    pal[IGNORE_INDEX] = VOID_RGB
    return pal


PALETTE = voc_palette()


def save_label_png(path: str | Path, label: np.ndarray) -> None:
    """Write an (H, W) label map with values in 0..255 as an 8-bit palette PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(PALETTE.ravel().tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # ids of folder inputs may name subfolders (sub/name)
    img.save(path, format="PNG")


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG as raw indices (no colour conversion). Grey 8-bit PNGs are read as indices too."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path}: label PNG must be palette (P) or 8-bit grey (L), got mode {img.mode}")
        return np.array(img, dtype=np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 RGB with the VOC palette."""
    return PALETTE[np.asarray(label, dtype=np.uint8)]
