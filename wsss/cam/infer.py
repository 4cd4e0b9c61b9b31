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
from ..kernels import cam_postprocess
from .cobra import attention_background, fuse
from .crf import CRF_PRESETS, crf_from_labels
from .multiscale import cam_to_label, multi_scale_stack


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
    """CAMs and seeds for a batch of images of any sizes; ``tags[i]`` (K,) multi-hot or None.

    The per-scale maps go through one fused post-processing call (``wsss.kernels.cam_postprocess``: Triton on
    CUDA, its PyTorch reference elsewhere). At a fixed ``input_size`` the normalised CAMs are resized to each
    image and thresholded there; at native size the kernel's label map is the seed.
    """
    if settings.input_size:
        stack, logits = multi_scale_stack(model, preprocess(images, settings.input_size, device), settings.scales,
                                          settings.flip)  # fmt: skip
        y = _tags(tags, logits, settings, device)
        cams, bkg, _ = postprocess(stack, y, settings)
        results = []
        for i, img in enumerate(images):
            cam = F.interpolate(cams[i : i + 1], size=img.shape[:2], mode="bilinear", align_corners=False)
            _, seed = cam_to_label(cam, y[i : i + 1], bkg[i])
            results.append(_result(cam[0], y[i], seed[0]))
        return results
    return _native(model, images, tags, settings, device)


def postprocess(stack: torch.Tensor, tags: torch.Tensor, settings: CAMSettings):
    """Per-scale maps (S, F, B, C, H, W) -> normalised K-channel CAMs, per-image background (B,) and labels.

    SeCo/CAM: flip max, min-max normalisation, threshold ``bkg_thresh`` (1.3-1.5). CoBra: flip sum, max
    normalisation of each source, ``settings.source`` fusion (4.19) and the attention-percentile background (4.20).
    """
    if settings.source is None:
        bkg = torch.full((stack.shape[2],), settings.bkg_thresh, device=stack.device)
        cams, label, _ = cam_postprocess(stack, tags, bkg, "max", "minmax", return_cams=True)
        return cams, bkg, label
    k = tags.shape[1]
    cnn, tran, attn = stack[:, :, :, :k], stack[:, :, :, k : 2 * k], stack[:, :, :, 2 * k]
    bkg = attention_background(attn.relu().sum((0, 1)), settings.bg_percentile)
    if settings.source in ("cnn", "vit", "fuse"):
        first, second = {"cnn": (cnn, None), "vit": (tran, None), "fuse": (cnn, tran)}[settings.source]
        cams, label, _ = cam_postprocess(first, tags, bkg, "sum", "max", cams2=second, return_cams=True)
        return cams, bkg, label
    m_cnn, m_tran = (cam_postprocess(m, tags, bkg, "sum", "max", return_cams=True)[0] for m in (cnn, tran))
    cams = fuse(m_cnn, m_tran, settings.source)
    return cams, bkg, cam_to_label(cams, tags, bkg[:, None, None])[1]


def _tags(tags: list[np.ndarray | None], logits: torch.Tensor, settings: CAMSettings, device) -> torch.Tensor:
    """Given tags where known, else the classifier's own (``sigmoid(z) > score_thresh``), as (B, K) float."""
    guessed = predicted_tags(logits, settings.score_thresh)
    given = [None if t is None else torch.as_tensor(t, dtype=torch.float32, device=device) for t in tags]
    return torch.stack([g if t is None else t for t, g in zip(given, guessed, strict=True)])


def _result(cam: torch.Tensor, y: torch.Tensor, seed: torch.Tensor) -> CAMResult:
    return CAMResult(cam.float().cpu(), y.cpu(), seed.to(torch.uint8).cpu().numpy())


def _native(model, images, tags, settings: CAMSettings, device) -> list[CAMResult]:
    """Images at their own size, zero-padded (in normalised units) to the patch grid, one pass per padded shape;
    each image's maps are cropped to its valid box before normalisation."""
    patch = model.patch_size
    padded = [(-(-h // patch) * patch, -(-w // patch) * patch) for h, w in (img.shape[:2] for img in images)]
    results: list[CAMResult | None] = [None] * len(images)
    for shape in dict.fromkeys(padded):
        group = [i for i, p in enumerate(padded) if p == shape]
        x = torch.zeros(len(group), 3, *shape, device=device)
        for row, i in enumerate(group):
            h, w = images[i].shape[:2]
            x[row, :, :h, :w] = preprocess([images[i]], None, device)[0]
        stack, logits = multi_scale_stack(model, x, settings.scales, settings.flip)
        y = _tags([tags[i] for i in group], logits, settings, device)
        for row, i in enumerate(group):
            h, w = images[i].shape[:2]
            cams, _, label = postprocess(stack[:, :, row : row + 1, :, :h, :w], y[row : row + 1], settings)
            results[i] = _result(cams[0], y[row], label[0])
    return results


def refine_seed_crf(image: np.ndarray, seed: np.ndarray, tags: np.ndarray, preset: str = "seed") -> np.ndarray:
    """Dense-CRF mask from a seed (METHODS 5.3 row C): labels restricted to background + the image's tags."""
    keys = np.concatenate([[0], np.flatnonzero(tags) + 1]).astype(np.int64)
    return crf_from_labels(image, seed, keys, CRF_PRESETS[preset])
