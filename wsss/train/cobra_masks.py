"""CoBra's mask stages after training (METHODS 4.1 steps 2-7, 4.9, 4.10): IR labels -> IRN -> random walk -> masks.

Each stage writes one palette PNG per image and skips images whose PNG exists, so an interrupted run resumes.

1. ``write_ir_labels``: fused seeds ``M_fuse`` of the image's classes, the attention thresholds (4.21) and two
   label CRFs give IR labels (255 = unsure).
2. ``fit_irn``: IRN's boundary and displacement heads trained on them (6.4-6.7).
3. ``write_masks``: the ViT-only stride-4 CAM ``M_tran^{/4}`` (``rw_source="tran"``, the code, D16) or the fused
   map (``"fuse"``, the paper's figures) diffused by the random walk (6.8, 6.9), then (4.22) and the row-D CRF.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..cam.cobra import fuse, ir_thresholds, max_normalize, split_sources
from ..cam.infer import preprocess
from ..cam.irn import cobra_mask, ir_labels, random_walk
from ..cam.multiscale import multi_scale_cam
from ..data.datasets import WSSSDataset
from ..data.palette import save_label_png
from ..models import save_checkpoint
from ..models.cobra import CoBraNet
from .irn import IRLabelDataset, IRNConfig, load_irn, train_irn


@dataclass
class CoBraMaps:
    """Per-image CoBra maps at the image resolution (4.17, 4.18), foreground channels of the present classes."""

    keys: np.ndarray  # (C + 1,) class ids, 0 first
    cnn: torch.Tensor  # M_cnn, max-normalised (C, H, W)
    tran: torch.Tensor  # M_tran, max-normalised (C, H, W)
    attn: torch.Tensor  # A_obj summed over scales and flips, not normalised (H, W)

    def stride4(self, m: torch.Tensor) -> torch.Tensor:
        """A map at IRN's stride-4 size ``((H-1)//4 + 1, (W-1)//4 + 1)``, max-normalised again.

        The code sums per-scale maps resized to that size; resizing the full-resolution sum instead differs only
        by the bilinear resampling of the sum.
        """
        h, w = m.shape[-2:]
        small = F.interpolate(m[None], size=((h - 1) // 4 + 1, (w - 1) // 4 + 1), mode="bilinear", align_corners=False)
        return max_normalize(small[0])


@torch.no_grad()
def cobra_maps(model: CoBraNet, image: np.ndarray, tags: np.ndarray, scales, device="cpu") -> CoBraMaps:
    """(4.17)/(4.18) multi-scale, flip-summed maps of one image at its own resolution (zero-padded to the grid)."""
    p = model.patch_size
    h, w = image.shape[:2]
    x = torch.zeros(1, 3, -(-h // p) * p, -(-w // p) * p, device=device)
    x[..., :h, :w] = preprocess([image], None, device)
    raw, _ = multi_scale_cam(model, x, tuple(scales), True, "sum", normalize=False)
    m_cnn, m_tran, a_obj = split_sources(raw[..., :h, :w], model.num_fg)
    present = torch.as_tensor(np.flatnonzero(tags), device=device)
    keys = np.concatenate([[0], np.flatnonzero(tags) + 1]).astype(np.int64)
    return CoBraMaps(keys, max_normalize(m_cnn[0, present]), max_normalize(m_tran[0, present]), a_obj[0])


def write_ir_labels(model: CoBraNet, data: WSSSDataset, out: Path, scales, percentile: float = 93.0,
                    fixed: tuple[float, float] | None = None, progress: bool = True) -> Path:  # fmt: skip
    """Stage 4 of 4.1: IR labels from ``M_fuse`` with (4.21) thresholds ``t_fg, t_bg`` and CRF row C.

    (4.21) reads the thresholds off the un-normalised class-token attention, whose scale grows with the ViT's
    depth and the number of scales and shrinks with the token count: calibrated for DeiT-S at 7 scales on VOC.
    ``fixed=(t_fg, t_bg)`` uses constants instead (IRN: 0.30, 0.05), for networks of other sizes.
    """
    for i, target in _missing(data, out, "IR labels", progress):
        sample = data[i]
        maps = cobra_maps(model, sample.image, _tags(data, i), scales)
        t_fg, t_bg = fixed or ir_thresholds(maps.attn, percentile)
        label = ir_labels(sample.image, fuse(maps.cnn, maps.tran).cpu().numpy(), maps.keys, t_fg, t_bg)
        save_label_png(target, label)
    return out


def fit_irn(cfg: IRNConfig, data: WSSSDataset, ir_dir: Path, out: Path, cobra: CoBraNet | None = None,
            seed: int = 0, progress: bool = True) -> Path:  # fmt: skip
    """Stage 5: train IRN on the IR labels. With ``cobra`` and no ``cfg.pretrained``, the IRN trunk starts from
    the CoBra CNN branch (the stand-in for ImageNet weights when none are available)."""
    if cobra is not None and cfg.pretrained is None:
        trunk = out.with_name(out.stem + "-trunk.safetensors")
        state = {k.removeprefix("cnn.net."): v for k, v in cobra.state_dict().items() if k.startswith("cnn.net.")}
        save_checkpoint(trunk, state, {"kind": "resnet_trunk", "source": "cobra cnn branch"})
        cfg = replace(cfg, pretrained=str(trunk))
    samples = IRLabelDataset.voc_samples(data, ir_dir)
    return train_irn(cfg, samples, out, seed=seed, progress=progress)


@torch.no_grad()
def write_masks(model: CoBraNet, irn_path: Path, data: WSSSDataset, out: Path, scales, rw_source: str = "tran",
                pad_size: int = 512, exp_times: int | None = None, progress: bool = True) -> Path:  # fmt: skip
    """Stages 6-7: random walk of ``M_tran^{/4}`` (or ``M_fuse``) on IRN's boundaries, (4.22), CRF row D.

    ``exp_times`` (default: the IRN checkpoint's, 8, i.e. ``T^256``) sets the walk length; 0 skips the walk.
    """
    if rw_source not in ("tran", "fuse"):
        raise ValueError(f"rw_source must be 'tran' or 'fuse', got {rw_source!r}")
    irn, cfg = load_irn(irn_path)
    for i, target in _missing(data, out, "masks", progress):
        sample = data[i]
        maps = cobra_maps(model, sample.image, _tags(data, i), scales)
        source = maps.tran if rw_source == "tran" else fuse(maps.cnn, maps.tran)
        edge = irn.infer_edge(preprocess([sample.image], None, "cpu")[0], pad_size)
        steps = cfg.exp_times if exp_times is None else exp_times
        rw = (
            random_walk(maps.stride4(source), edge, cfg.beta, steps, cfg.radius_infer)
            if steps
            else maps.stride4(source)
        )
        save_label_png(target, cobra_mask(rw, sample.image.shape[:2], maps.keys, image=sample.image))
    return out


def _missing(data: WSSSDataset, out: Path, desc: str, progress: bool):
    """(index, OUT/ID.png) for every image whose PNG is not written yet: reruns resume where a stage stopped."""
    out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(data)), desc=desc, disable=not progress):
        target = out / f"{data.ids[i]}.png"
        if not target.is_file():
            yield i, target


def _tags(data: WSSSDataset, i: int) -> np.ndarray:
    tags = data.labels(i)
    if tags is None:
        raise ValueError(f"{data.ids[i]}: CoBra masks need image-level labels")
    return tags
