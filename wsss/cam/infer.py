"""The one CAM post-processing path: images -> multi-scale CAMs -> seeds (-> dense-CRF masks).

Used alike by training validation, ``wsss cam`` and ``wsss label`` (any backend), and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .cobra import cobra_seed_maps
from .crf import CRF_PRESETS, crf_from_labels
from .multiscale import cam_to_label, multi_scale_cam, normalize_cam


@dataclass(frozen=True)
class CAMSettings:
    """How CAMs become seeds.

    Images are resized to ``input_size`` x ``input_size`` (SeCo's validation convention, aspect ignored), or with
    ``input_size=None`` kept at their own resolution, padded to a multiple of the patch size (images of one padded
    shape share a forward pass; CAMs are cropped to the valid box before normalisation). CAMs are computed at
    ``scales`` with flips, resized back to the image and thresholded at ``bkg_thresh``. Without image tags,
    classes with ``sigmoid(logit) > score_thresh`` are used (the top class if none passes).

    SeCo/CAM networks: flips merged by max, min-max normalisation (METHODS 1.3). CoBra networks (``source`` set):
    flips summed, each source max-normalised and combined by ``source`` (cnn, vit, avg, max, fuse), background =
    the ``bg_percentile``-th percentile of the class-token attention (4.17-4.20).
    """

    input_size: int | None = 448
    scales: tuple[float, ...] = (1.0, 0.5, 0.75, 1.5)
    flip: bool = True
    bkg_thresh: float = 0.5
    score_thresh: float = 0.5
    source: str | None = None
    bg_percentile: float = 70.0

    @property
    def flip_merge(self) -> str:
        return "max" if self.source is None else "sum"


@dataclass
class CAMResult:
    cam: torch.Tensor  # (K, H, W) float32 in [0, 1), at the image's resolution
    tags: torch.Tensor  # (K,) the classes used (given or predicted)
    seed: np.ndarray  # (H, W) uint8: 0 background, 1..K classes


def preprocess(images: list[np.ndarray], size: int | None, device: torch.device | str) -> torch.Tensor:
    """uint8 HxWx3 images -> one normalised (B, 3, size, size) batch (bilinear, align_corners=False).

    ``size=None`` keeps the (single, or equally sized) images at their resolution.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for img in images:
        x = torch.from_numpy(np.require(img, requirements=("C", "W"))).to(device)
        x = x.permute(2, 0, 1)[None].float() / 255
        out.append(x if size is None else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
    return (torch.cat(out) - mean) / std


def predicted_tags(logits: torch.Tensor, score_thresh: float) -> torch.Tensor:
    """Classes the classifier itself sees: ``sigmoid(z) > score_thresh``, at least the top-scoring one."""
    tags = (logits.sigmoid() > score_thresh).float()
    top = F.one_hot(logits.argmax(1), logits.shape[1]).float()
    return torch.maximum(tags, top)


@torch.no_grad()
def predict_cams(
    model: nn.Module,
    images: list[np.ndarray],
    tags: list[np.ndarray | None],
    settings: CAMSettings,
    device: torch.device | str = "cpu",
) -> list[CAMResult]:
    """CAMs and seeds for a batch of images of any sizes; ``tags[i]`` (K,) multi-hot or None."""
    if settings.input_size:
        x = preprocess(images, settings.input_size, device)
        raw, logits = multi_scale_cam(model, x, settings.scales, settings.flip, settings.flip_merge, normalize=False)
        cams, bkgs = finish_cams(raw, settings)
        cams = [F.interpolate(c[None], size=img.shape[:2], mode="bilinear", align_corners=False)[0]
                for c, img in zip(cams, images, strict=True)]  # fmt: skip
    else:
        cams, bkgs, logits = _native_cams(model, images, settings, device)
    guessed = predicted_tags(logits, settings.score_thresh)
    results = []
    for i, cam in enumerate(cams):
        y = guessed[i] if tags[i] is None else torch.as_tensor(tags[i], dtype=torch.float32, device=device)
        _, seed = cam_to_label(cam[None], y[None], bkgs[i])
        results.append(CAMResult(cam.float().cpu(), y.cpu(), seed[0].to(torch.uint8).cpu().numpy()))
    return results


def finish_cams(raw: torch.Tensor, settings: CAMSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulated multi-scale maps (B, C, H, W) -> normalised K-channel CAMs and per-image background (B, 1, 1)."""
    if settings.source is None:
        return normalize_cam(raw), torch.full((raw.shape[0], 1, 1), settings.bkg_thresh, device=raw.device)
    return cobra_seed_maps(raw, (raw.shape[1] - 1) // 2, settings.source, settings.bg_percentile)


def _native_cams(model, images, settings: CAMSettings, device):
    """Images at their own size, zero-padded (in normalised units) to the patch grid, one pass per padded shape."""
    patch = model.patch_size
    padded = [(-(-h // patch) * patch, -(-w // patch) * patch) for h, w in (img.shape[:2] for img in images)]
    cams: list[torch.Tensor | None] = [None] * len(images)
    bkgs: list[torch.Tensor | None] = [None] * len(images)
    logits: list[torch.Tensor | None] = [None] * len(images)
    for shape in dict.fromkeys(padded):
        group = [i for i, p in enumerate(padded) if p == shape]
        x = torch.zeros(len(group), 3, *shape, device=device)
        for row, i in enumerate(group):
            h, w = images[i].shape[:2]
            x[row, :, :h, :w] = preprocess([images[i]], None, device)[0]
        fused, z = multi_scale_cam(model, x, settings.scales, settings.flip, settings.flip_merge, normalize=False)
        for row, i in enumerate(group):
            h, w = images[i].shape[:2]
            cam, bkg = finish_cams(fused[row : row + 1, :, :h, :w], settings)
            cams[i], bkgs[i], logits[i] = cam[0], bkg[0], z[row]
    return cams, bkgs, torch.stack(logits)


def refine_seed_crf(image: np.ndarray, seed: np.ndarray, tags: np.ndarray, preset: str = "seed") -> np.ndarray:
    """Dense-CRF mask from a seed (METHODS 5.3 row C): labels restricted to background + the image's tags."""
    keys = np.concatenate([[0], np.flatnonzero(tags) + 1]).astype(np.int64)
    return crf_from_labels(image, seed, keys, CRF_PRESETS[preset])
