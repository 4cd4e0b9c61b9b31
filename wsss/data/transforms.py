"""Training augmentation (§3.3, §1.6) and normalisation, in OpenCV and torch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """The SeCo/ToCo global-view recipe: random rescale, flip, colour jitter, crop onto a black canvas."""

    crop: int = 448
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: float = 0.5
    jitter: float = 0.8  # probability of ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)


def random_rescale(img: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float]) -> np.ndarray:
    r = rng.uniform(*scale_range)
    h, w = img.shape[:2]
    return cv2.resize(img, (max(int(r * w), 1), max(int(r * h), 1)), interpolation=cv2.INTER_LINEAR)


def color_jitter(
    img: np.ndarray, rng: np.random.Generator, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1
) -> np.ndarray:
    """torchvision-style ColorJitter on a uint8 RGB image; the four operations in random order."""
    out = img.astype(np.float32)
    for op in rng.permutation(4):
        if op == 0:
            out = out * rng.uniform(1 - brightness, 1 + brightness)
        elif op == 1:
            grey = (out @ np.array([0.299, 0.587, 0.114], np.float32)).mean()
            out = (out - grey) * rng.uniform(1 - contrast, 1 + contrast) + grey
        elif op == 2:
            grey = (out @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
            out = (out - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
        else:
            hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-hue, hue) * 256)) % 256
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL).astype(np.float32)
        out = np.clip(out, 0, 255)
    return out.astype(np.uint8)


def random_crop(img: np.ndarray, crop: int, rng: np.random.Generator, fill=0) -> tuple[np.ndarray, np.ndarray]:
    """Place ``img`` on a black canvas of at least ``crop`` x ``crop`` and cut a random crop (§1.6).

    Returns the crop and ``img_box = (top, bottom, left, right)``, the half-open region of real pixels.
    ``fill``: the canvas value per channel (``augment_with_mask`` pads its mask channel with 255, ignored).
    """
    h, w = img.shape[:2]
    ch, cw = max(crop, h), max(crop, w)
    hpad, wpad = int(rng.integers(0, ch - h + 1)), int(rng.integers(0, cw - w + 1))
    canvas = np.full((ch, cw, img.shape[2]), fill, np.uint8)
    canvas[hpad : hpad + h, wpad : wpad + w] = img
    hs, ws = int(rng.integers(0, ch - crop + 1)), int(rng.integers(0, cw - crop + 1))
    box = np.array([max(hpad - hs, 0), min(crop, h + hpad - hs), max(wpad - ws, 0), min(crop, w + wpad - ws)], np.int16)
    return canvas[hs : hs + crop, ws : ws + crop], box


def augment(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training view: (crop uint8 HxWx3, img_box)."""
    img = random_rescale(img, rng, cfg.scale_range)
    if rng.random() < cfg.flip:
        img = img[:, ::-1]
    if rng.random() < cfg.jitter:
        img = color_jitter(img, rng)
    return random_crop(np.ascontiguousarray(img), cfg.crop, rng)


def augment_with_mask(img: np.ndarray, mask: np.ndarray, cfg: AugmentConfig,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One segmentation training view: the image and its (H, W) uint8 mask rescaled (bilinear / nearest), flipped
    and cropped together, the image colour-jittered; canvas padding is 255 (ignored) in the mask."""
    r = rng.uniform(*cfg.scale_range)
    size = (max(int(r * img.shape[1]), 1), max(int(r * img.shape[0]), 1))
    img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    if rng.random() < cfg.flip:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if rng.random() < cfg.jitter:
        img = color_jitter(img, rng)
    both, _ = random_crop(np.ascontiguousarray(np.dstack([img, mask])), cfg.crop, rng, fill=(0, 0, 0, 255))
    return both[..., :3], both[..., 3]


def normalize_images(img: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=None) -> torch.Tensor:
    """uint8 HxWx3 RGB -> normalised float32 3xHxW, ``(x / 255 - mean) / std`` (the one normalisation)."""
    x = torch.from_numpy(np.require(img, requirements=("C", "W"))).to(device).permute(2, 0, 1).float().div_(255)
    m, s = _channel_stats(tuple(mean), tuple(std), x.device)
    return (x - m) / s


def to_tensor(img: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 HxWx3 RGB -> normalised float32 3xHxW on the CPU."""
    return normalize_images(img, mean, std)


def denormalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised (..., 3, H, W) -> RGB in [0, 1]."""
    m, s = _channel_stats(tuple(mean), tuple(std), x.device)
    return (x * s + m).clamp(0, 1)


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) mean and std on ``device``, made once per device: no host-to-device copy in every call.
    Read only (shared between calls)."""
    return torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1)


def to_uint8_levels(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised (..., 3, H, W) -> the official code's ``uint8`` image, as float: ``x * std + mean`` in 0-255
    units with Python-scalar constants (as ``denormalize_img`` computes it), truncated toward zero and wrapped like
    a ``uint8`` cast (§2.1, Q2.4)."""
    levels = torch.stack([x.select(-3, c) * (std[c] * 255) + mean[c] * 255 for c in range(3)], dim=-3)
    return levels.trunc().to(torch.int64).remainder(256).float()


def random_resized_crop(
    img: np.ndarray, size: int, rng: np.random.Generator, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)
) -> np.ndarray:
    """torchvision's RandomResizedCrop (10 tries, then a centre crop), resized bicubically to ``size``."""
    h, w = img.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        ch, cw = min(h, w), min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(img[top : top + ch, left : left + cw], (size, size), interpolation=cv2.INTER_CUBIC)


def photometric(img: np.ndarray, rng: np.random.Generator, jitter=0.8, grey=0.2, blur=0.1, solarize=0.0):
    """Colour jitter, grey scale, Gaussian blur (sigma ~ U(0.1, 2)) and solarisation, each with its probability."""
    if rng.random() < jitter:
        img = color_jitter(img, rng)
    if rng.random() < grey:
        img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if rng.random() < blur:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.1, 2.0))
    if rng.random() < solarize:
        img = np.where(img >= 128, 255 - img, img).astype(np.uint8)
    return np.ascontiguousarray(img)


def seco_views(img: np.ndarray, crop: np.ndarray, size: int, rng: np.random.Generator, s_flip: float = 0.5):
    """SeCo's extra views (§3.3): ``w_img`` from the original image, ``s_img`` (strong) from the training crop.

    ``s_flip`` 0.5 reproduces quirk Q3.4 (the strong view flips independently of the crop); 0 keeps them aligned.
    """
    w_img = random_resized_crop(img, size, rng)
    if rng.random() < 0.5:
        w_img = w_img[:, ::-1]
    w_img = photometric(np.ascontiguousarray(w_img), rng, jitter=0.8, grey=0.2, blur=0.1, solarize=0.2)
    s_img = crop[:, ::-1] if rng.random() < s_flip else crop
    s_img = photometric(np.ascontiguousarray(s_img), rng, jitter=0.8, grey=0.2, blur=0.5)
    return w_img, s_img
