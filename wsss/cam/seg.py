"""The final segmentation protocol (§3.15 "Final segmentation", SeCo's ``tools/infer_seg_voc.py``).

For any network with a decoder (SeCo's ASPP, ``wsss.models.segnet``), behind any backend that returns ``(seg,)``
logits (B, C, h, w) with background in channel 0:

1. for each scale ``s`` (1.0, 1.25, 1.5): the image resized directly to ``(floor(S s), floor(S s))``
   (``S = input_size``, 448 for VOC; each image's own ``floor(s H), floor(s W)`` at native size), bilinear
   (ac=False), with its flip in the same batch; logits resized to the image's size, the two flips **summed**;
2. the element-wise **max** over scales: the logits ``Sigma`` (C, H, W); raw prediction ``argmax Sigma``;
3. ``softmax(Sigma)`` -> dense CRF (§5.3 row A: 10 iterations, Gaussian (1, 1), bilateral (121, 5, 4)) on the
   original uint8 image -> argmax (``refine_segmentation``; the labeler runs it batched on a GPU or pooled).

The scaled inputs come from the CAM path's ``image_pyramid`` (one scale at a time, so each is resized from the
original), and the results are ``CAMResult``s, so the labeler handles both sources alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models.spec import CAMSettings
from .crf import CRF_PRESETS, crf_from_probs
from .crf_torch import crf_from_probs_batch
from .pipeline import CAMResult, _on_host, image_pyramid, run_scales

SEG_SCALES = (1.0, 1.25, 1.5)  # §3.15, [SeCo] tools/infer_seg_voc.py
SEG_CRF = CRF_PRESETS["seg"]  # §5.3 row A


def seg_settings(cam: CAMSettings, scales=SEG_SCALES) -> CAMSettings:
    """A network's inference settings for segmentation: its input size, §3.15's scales, flips summed."""
    return cam.replace(scales=tuple(scales), flip=True, flip_merge="sum", rescale="bilinear_floor")


def scaled_inputs(images: list[np.ndarray], settings: CAMSettings, device, mean, std) -> list[torch.Tensor]:
    """One normalised batch per scale, each resized from the original image: ``floor(S s)`` squared at a fixed
    input size ``S``, else ``floor(s H), floor(s W)`` of images that share their size."""
    if not settings.input_size:
        return image_pyramid(images, settings, device, mean, std)
    return [image_pyramid(images, settings.replace(input_size=int(settings.input_size * s), scales=(1.0,)), device,
                          mean, std)[0] for s in run_scales(settings)]  # fmt: skip


@torch.no_grad()
def segment_logits(net, images: list[np.ndarray], settings: CAMSettings, device: torch.device | str = "cpu",
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[torch.Tensor]:  # fmt: skip
    """Steps 1-2: the multi-scale, flip-summed, scale-maxed logits ``Sigma`` (C, H_i, W_i) of each image, on
    ``device``."""
    if not settings.input_size and len({img.shape[:2] for img in images}) > 1:
        out: list[torch.Tensor | None] = [None] * len(images)
        shapes = [img.shape[:2] for img in images]
        for shape in dict.fromkeys(shapes):
            group = [i for i, s in enumerate(shapes) if s == shape]
            for i, logits in zip(group, segment_logits(net, [images[i] for i in group], settings, device, mean,
                                                       std), strict=True):  # fmt: skip
                out[i] = logits
        return out
    b = len(images)
    merged: list[torch.Tensor | None] = [None] * b
    for x in scaled_inputs(images, settings, device, mean, std):
        (seg,) = net(torch.cat([x, x.flip(-1)]) if settings.flip else x)
        for i, img in enumerate(images):
            pair = seg[i::b] if settings.flip else seg[i : i + 1]
            up = F.interpolate(pair.float(), size=img.shape[:2], mode="bilinear", align_corners=False)
            logits = up[0] + up[1].flip(-1) if settings.flip else up[0]
            merged[i] = logits if merged[i] is None else torch.maximum(merged[i], logits)
    return merged


@torch.no_grad()
def predict_segmentation(net, images: list[np.ndarray], tags: list[np.ndarray | None], settings: CAMSettings,
                         device: torch.device | str = "cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         on_device: bool = False) -> list[CAMResult]:  # fmt: skip
    """``predict_cams``' counterpart for segmentation logits: per image ``cam`` the class probabilities
    ``softmax(Sigma)`` (C, H, W), ``seed`` the raw prediction ``argmax Sigma`` (uint8) and ``tags`` the classes it
    contains (K,). ``tags`` (the images' tags) are not used: the protocol predicts every class (§3.15)."""
    results = []
    for logits in segment_logits(net, images, settings, device, mean, std):
        label = logits.argmax(0)
        present = torch.zeros(logits.shape[0], device=logits.device).index_fill_(0, label.flatten(), 1.0)[1:]
        results.append(CAMResult(logits.softmax(0), present, label.to(torch.uint8)))
    return results if on_device else _on_host(results)


def refine_segmentation(images: list[np.ndarray], probs: list, impl: str = "pydensecrf",
                        device: torch.device | str | None = None) -> list[np.ndarray | torch.Tensor]:  # fmt: skip
    """Step 3: the CRF of row A on ``probs`` (C, H, W) per image -> uint8 labels: pydensecrf per image (NumPy
    arrays) or the torch lattice, batched (tensors on ``device``)."""
    if impl == "pydensecrf":
        return [crf_from_probs(img, np.asarray(p, np.float32), SEG_CRF).astype(np.uint8)
                for img, p in zip(images, probs, strict=True)]  # fmt: skip
    return [lab.to(torch.uint8) for lab in crf_from_probs_batch(images, probs, SEG_CRF, device)]
