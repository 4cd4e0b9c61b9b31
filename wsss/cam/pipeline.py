"""The one CAM post-processing path: images -> scale pyramid -> raw CAMs -> aligned stack -> seeds.

Every consumer goes through it: SeCo's training pseudo-labels, validation, ``wsss cam``, ``wsss label`` (any
backend), CoBra's mask stages and the normalised output of exported graphs. It is parameterised by the spec's
``CAMSettings``, which fix each method's official order of operations (§1.3 SeCo, §4.8 CoBra):

1. ``image_pyramid`` / ``tensor_pyramid``: the scaled inputs;
2. ``forward_pyramid``: the network on each scale and its flip; raw CAM groups on their own grids;
3. ``stack_maps``: (ReLU on the grid first, for CoBra) upsampling to (H, W), flips aligned -> (S, F, B, C, H, W);
4. ``postprocess``: flip merge, scale sum, normalisation, source fusion and labels in one call of
   ``wsss.kernels.cam_postprocess`` (Triton on CUDA, its PyTorch reference elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from ..kernels import cam_postprocess, combine_sources, normalize_maps
from ..models.spec import CAMSettings
from .cobra import attention_background
from .labels import cam_to_label


@dataclass
class CAMResult:
    """One image's CAMs and seed, on the host (``seed`` a NumPy array) or, from ``predict_cams(on_device=True)``,
    all on the device (``seed`` a tensor)."""

    cam: torch.Tensor | None  # (K, H, W) normalised (fused) CAMs at the image's resolution (None: not fetched)
    tags: torch.Tensor  # (K,) float multi-hot, the classes used (given or predicted)
    seed: np.ndarray | torch.Tensor  # (H, W) uint8: 0 background, 1..K classes
    confidence: float | None = None  # the labeler's per-item confidence (wsss.runtime.labeler._confidence)


@dataclass
class RawCAMs:
    """The network's outputs over a pyramid: base-scale logits and, per scale, its CAM groups (F * B, C, h, w)."""

    logits: torch.Tensor
    groups: list[list[torch.Tensor]]
    batch: int
    flip: bool


def pyramid_sizes(size: tuple[int, int], settings: CAMSettings) -> list[tuple[int, int]]:
    """Input size per scale, in run order. §1.3: scale 1.0 first (quirk Q1.5), ``floor(s * H)``; §4.8: the
    listed order, ``round(s * H)`` (NumPy's half-to-even)."""
    h, w = size
    if settings.rescale == "bilinear_floor":
        return [(int(s * h), int(s * w)) for s in run_scales(settings)]
    return [(int(np.round(s * h)), int(np.round(s * w))) for s in run_scales(settings)]


def run_scales(settings: CAMSettings) -> list[float]:
    """The scales in run order: §1.3 prepends 1.0 (quirk Q1.5); §4.8 runs the list as given."""
    if settings.rescale == "bilinear_floor":
        return [1.0, *[s for s in settings.scales if s != 1.0]]
    return list(settings.scales)


def image_pyramid(images: Sequence[np.ndarray], settings: CAMSettings, device: torch.device | str = "cpu",
                  mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[torch.Tensor]:  # fmt: skip
    """uint8 HxWx3 images (of one size, or any sizes with ``input_size``) -> one normalised batch per scale.

    SeCo (``bilinear_floor``): normalise, resize to ``input_size`` and to each scale bilinearly (ac=False), as
    the code does on normalised tensors. CoBra (``pil_bicubic_round``): PIL bicubic on the uint8 image, then
    normalise, as its data loader does. Normalised on the host, the images reach ``device`` in one copy.
    """
    if settings.rescale == "bilinear_floor":
        x = [t[None] for t in to_device([normalize_images(img, mean, std) for img in _same_size(images, settings)],
                                        device)]  # fmt: skip
        if settings.input_size:
            size = (settings.input_size,) * 2
            x = [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in x]
        return tensor_pyramid(torch.cat(x), settings)
    if settings.input_size:
        images = [_pil_resize(img, (settings.input_size,) * 2) for img in images]
    images = _same_size(images, settings)
    sizes = pyramid_sizes(images[0].shape[:2], settings)
    return to_device([torch.stack([normalize_images(_pil_resize(img, size), mean, std) for img in images])
                      for size in sizes], device)  # fmt: skip


def to_device(arrays: Sequence[np.ndarray | torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Host arrays of one dtype -> tensors on ``device`` in one copy: packed into one buffer (pinned for CUDA),
    copied without blocking the host, then viewed in their own shapes."""
    device = torch.device(device)
    parts = [torch.as_tensor(a).reshape(-1) for a in arrays]
    flat = torch.empty(sum(p.numel() for p in parts), dtype=parts[0].dtype, pin_memory=device.type == "cuda")
    flat = torch.cat(parts, out=flat).to(device, non_blocking=True)
    return [v.view(tuple(a.shape)) for v, a in zip(flat.split([p.numel() for p in parts]), arrays, strict=True)]


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Tensors -> NumPy arrays, with one device-to-host copy (one wait) per dtype among them."""
    out: list[np.ndarray | None] = [None] * len(tensors)
    for dtype in {t.dtype for t in tensors}:
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).cpu().numpy()
        for i, a in zip(idx, np.split(flat, np.cumsum([tensors[i].numel() for i in idx])[:-1]), strict=True):
            out[i] = a.reshape(tensors[i].shape)
    return out


def base_size(images: Sequence[np.ndarray], settings: CAMSettings) -> tuple[int, int]:
    """The size the CAMs of a pyramid are accumulated at: ``input_size`` squared, or the images' own."""
    return (settings.input_size,) * 2 if settings.input_size else tuple(images[0].shape[:2])


def tensor_pyramid(x: torch.Tensor, settings: CAMSettings) -> list[torch.Tensor]:
    """A normalised batch at every scale of §1.3: ``Bil(x; floor(sH), floor(sW), ac=False)``, 1.0 first."""
    out = []
    for size in pyramid_sizes(tuple(x.shape[-2:]), settings):
        same = size == tuple(x.shape[-2:])
        out.append(x if same else F.interpolate(x, size=size, mode="bilinear", align_corners=False))
    return out


@torch.no_grad()
def forward_pyramid(net, inputs: list[torch.Tensor], settings: CAMSettings) -> RawCAMs:
    """Run ``net(x) -> (logits, *cam groups)`` on every scale (with its flip in the same batch); with
    ``settings.layers``, ``net.layer_cams(x, layers)`` (the CAM fused with LayerCAM maps) instead."""
    b = inputs[0].shape[0]
    groups, logits = [], None
    base = next((i for i, s in enumerate(run_scales(settings)) if s == 1.0), 0)
    run = cam_forward(net, settings.layers)
    for i, xs in enumerate(inputs):
        z, *maps = run(torch.cat([xs, xs.flip(-1)]) if settings.flip else xs)
        groups.append(maps)
        if i == base:
            logits = z[:b]
    return RawCAMs(logits, groups, b, settings.flip)


def cam_forward(net, layers: tuple[int, ...]):
    """``net`` itself, or with LayerCAM ``layers`` its ``layer_cams``: a gradient pass that exported graphs lack
    (a one-line error for such a backend, which the labeler raises before any work)."""
    if not layers:
        return net
    if not hasattr(net, "layer_cams"):
        raise ValueError(f"cam.layers={list(layers)} (LayerCAM) needs the network's gradients, which the "
                         f"{getattr(net, 'name', type(net).__name__)} backend does not give: use the torch backend, "
                         "or --layers none")  # fmt: skip
    return lambda x: net.layer_cams(x, layers)


def stack_maps(raw: RawCAMs, size: tuple[int, int], settings: CAMSettings) -> torch.Tensor:
    """(S, F, B, C, H, W): each group (ReLU'd on its grid first when ``relu_first``, §4.8) upsampled bilinearly
    (ac=False) to ``size``, groups concatenated along C, flipped halves flipped back."""
    per_scale = []
    for maps in raw.groups:
        up = [F.interpolate(m.relu() if settings.relu_first else m, size=size, mode="bilinear", align_corners=False)
              for m in maps]  # fmt: skip
        a = torch.cat(up, dim=1)
        b = raw.batch
        per_scale.append(torch.stack([a[:b], a[b:].flip(-1)]) if raw.flip else a[None])
    return torch.stack(per_scale)


def postprocess(stack: torch.Tensor, tags: torch.Tensor, settings: CAMSettings):
    """(S, F, B, C, H, W) -> normalised K-channel CAMs (B, K, H, W), background per image (B,) and labels (B, H, W).

    Threshold rule (1.3)-(1.6): the K channels, background ``bkg_thresh``. Attention rule (4.17)-(4.20): channels
    ``[:K]`` CNN, ``[K:2K]`` ViT, ``[2K]`` ``A_obj``; background ``Perc_theta`` of the summed ``A_obj``; sources
    combined by ``settings.source``.
    """
    merge, norm = settings.flip_merge, settings.norm
    if settings.background == "threshold":
        bkg = torch.full((stack.shape[2],), settings.bkg_thresh, device=stack.device)
        cams, label, _ = cam_postprocess(stack, tags, bkg, merge, norm, return_cams=True)
        return cams, bkg, label
    k = tags.shape[1]
    cnn, vit = stack[:, :, :, :k], stack[:, :, :, k : 2 * k]
    bkg = attention_background(stack[:, :, :, 2 * k].relu().sum((0, 1)), settings.bg_percentile)
    source = settings.source or "fuse"
    if source in ("cnn", "vit"):
        cams, label, _ = cam_postprocess(cnn if source == "cnn" else vit, tags, bkg, merge, norm, return_cams=True)
    else:
        cams, label, _ = cam_postprocess(cnn, tags, bkg, merge, norm, cams2=vit, return_cams=True, combine=source)
    return cams, bkg, label


def normalized_maps(stack: torch.Tensor, settings: CAMSettings) -> torch.Tensor:
    """All channels of a stack merged and normalised (no labels): SeCo's training CAMs (1.4), (1.5)."""
    b, c = stack.shape[2:4]
    ones = torch.ones(b, c, device=stack.device)
    return cam_postprocess(stack, ones, 0.0, settings.flip_merge, settings.norm, return_cams=True)[0]


def single_scale_maps(groups: Sequence[torch.Tensor], size: tuple[int, int], settings: CAMSettings) -> torch.Tensor:
    """One pass's CAM groups -> normalised maps at ``size`` without tags (the optional output of exported graphs).

    Threshold rule: (B, K) min-max normalised ReLU'd CAMs. Attention rule: (B, K + 1), the combined, max-normalised
    sources (4.17), (4.19) and ``A_obj`` as is in channel K, which the percentile background (4.20) reads.
    """
    raw = RawCAMs(groups[0].new_zeros(0), [list(groups)], groups[0].shape[0], flip=False)
    a = stack_maps(raw, size, settings)[0, 0].relu()
    if settings.background == "threshold":
        return normalize_maps(a, settings.norm)
    k = (a.shape[1] - 1) // 2
    cnn, vit = normalize_maps(a[:, :k], settings.norm), normalize_maps(a[:, k : 2 * k], settings.norm)
    source = settings.source or "fuse"
    m = cnn if source == "cnn" else vit if source == "vit" else combine_sources(cnn, vit, source)
    return torch.cat([m, a[:, 2 * k :]], dim=1)


def predicted_tags(logits: torch.Tensor, score_thresh: float) -> torch.Tensor:
    """Classes the classifier itself sees: ``sigmoid(z) > score_thresh``, at least the top-scoring one."""
    tags = (logits.sigmoid() > score_thresh).float()
    top = F.one_hot(logits.argmax(1), logits.shape[1]).float()
    return torch.maximum(tags, top)


@torch.no_grad()
def predict_cams(net, images: list[np.ndarray], tags: list[np.ndarray | None], settings: CAMSettings,
                 device: torch.device | str = "cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 on_device: bool = False) -> list[CAMResult]:  # fmt: skip
    """CAMs and seeds for images of any sizes; ``tags[i]`` (K,) multi-hot, or None for the classifier's own.

    At a fixed ``input_size`` the batch runs at that size and each image's normalised CAMs are resized to it and
    thresholded there (§3.15). At native size images of one shape share a pass; none is padded. ``on_device``:
    the results stay on ``device`` for further work there (PAR); else they come to the host in one copy per dtype
    (``cam`` float32 and ``tags`` CPU tensors, ``seed`` a uint8 array).
    """
    if settings.input_size:
        results = _predict(net, images, tags, settings, device, mean, std)
    else:
        results: list[CAMResult | None] = [None] * len(images)
        shapes = [img.shape[:2] for img in images]
        for shape in dict.fromkeys(shapes):
            group = [i for i, s in enumerate(shapes) if s == shape]
            for i, r in zip(group, _predict(net, [images[i] for i in group], [tags[i] for i in group], settings,
                                            device, mean, std), strict=True):  # fmt: skip
                results[i] = r
    return results if on_device else _on_host(results)


def _predict(net, images, tags, settings: CAMSettings, device, mean, std) -> list[CAMResult]:
    """One pass of images of one size (or of any sizes at a fixed ``input_size``); results on the device."""
    inputs = image_pyramid(images, settings, device, mean, std)
    raw = forward_pyramid(net, inputs, settings)
    y = _tags(tags, raw.logits, settings)
    cams, bkg, label = postprocess(stack_maps(raw, base_size(images, settings), settings), y, settings)
    if not settings.input_size:
        return [CAMResult(cams[i], y[i], label[i].to(torch.uint8)) for i in range(len(images))]
    results = []
    for i, img in enumerate(images):
        cam = F.interpolate(cams[i : i + 1], size=img.shape[:2], mode="bilinear", align_corners=False)
        _, seed = cam_to_label(cam, y[i : i + 1], bkg[i])
        results.append(CAMResult(cam[0], y[i], seed[0].to(torch.uint8)))
    return results


def _tags(tags: list[np.ndarray | None], logits: torch.Tensor, settings: CAMSettings) -> torch.Tensor:
    """Given tags where known, else the classifier's own (``sigmoid(z) > score_thresh``), as (B, K) float; the given
    ones reach the device in one copy (NaN rows: not given)."""
    guessed = predicted_tags(logits, settings.score_thresh)
    given = np.full(guessed.shape, np.nan, np.float32)
    for i, t in enumerate(tags):
        if t is not None:
            given[i] = t
    given = to_device([given], logits.device)[0]
    return torch.where(given.isnan(), guessed, given)


def _on_host(results: list[CAMResult]) -> list[CAMResult]:
    n = len(results)
    host = to_host([*(r.seed for r in results), *(r.tags for r in results), *(r.cam.float() for r in results)])
    return [CAMResult(torch.from_numpy(c), torch.from_numpy(t), s)
            for s, t, c in zip(host[:n], host[n : 2 * n], host[2 * n :], strict=True)]  # fmt: skip


def _same_size(images: Sequence[np.ndarray], settings: CAMSettings) -> Sequence[np.ndarray]:
    if settings.input_size is None and len({img.shape[:2] for img in images}) > 1:
        raise ValueError("images of different sizes need input_size, or one call per size")
    return images


def _pil_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic to (h, w) on uint8, skipped at the same size (CoBra's ``imutils.pil_resize``)."""
    if tuple(img.shape[:2]) == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))
