"""CoBra's mask stages after training (§4.1 steps 2-7, §4.9, §4.10): IR labels -> IRN -> random walk -> masks.

Each stage writes one palette PNG per image and skips images whose PNG exists, so an interrupted run resumes.

1. ``write_ir_labels``: fused seeds ``M_fuse`` of the image's classes, the attention thresholds (4.21) and two
   label CRFs give IR labels (255 = unsure).
2. ``fit_irn``: IRN's boundary and displacement heads trained on them (§6.4-§6.7).
3. ``write_masks``: the ViT-only stride-4 CAM ``M_tran^{/4}`` (``rw_source="tran"``, the code, D16) or the fused
   map (``"fuse"``, the paper's figures) diffused by the random walk (6.8)-(6.9), then (4.22) and the row-D CRF.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..cam.cobra import ir_thresholds
from ..cam.irn import cobra_mask, ir_labels, random_walk
from ..cam.pipeline import forward_pyramid, image_pyramid, stack_maps
from ..data.datasets import WSSSDataset, check_classes
from ..data.palette import save_label_png
from ..data.transforms import normalize_images
from ..kernels import combine_sources, normalize_maps
from ..models import CAMSettings, LoadedModel, save_checkpoint
from ..models.cobra import CoBraNet
from .irn import IRLabelDataset, IRNConfig, cobra_irn_trunk, load_irn, train_irn
from .loop import select_device


@dataclass
class CoBraMaps:
    """Per-image CoBra maps (4.17), (4.18), foreground channels of the present classes, as ``make_cam.py`` saves."""

    keys: np.ndarray  # (C + 1,) class ids, 0 first
    cnn: torch.Tensor  # M_cnn at (H, W), max-normalised (C, H, W): "high_res_cnn"
    tran: torch.Tensor  # M_tran at (H, W), max-normalised: "high_res_seed"
    attn: torch.Tensor  # A_obj at (H, W) summed over scales and flips, not normalised: "high_res_attn"
    cnn4: torch.Tensor  # the same at IRN's stride-4 size ((H-1)//4 + 1, (W-1)//4 + 1), each scale resized there
    tran4: torch.Tensor  # M_tran^{/4}: "cam", the random walk's input

    def fused(self, stride4: bool = False) -> torch.Tensor:
        """(4.19) ``M_fuse`` at full or stride-4 resolution."""
        return combine_sources(self.cnn4, self.tran4) if stride4 else combine_sources(self.cnn, self.tran)


@torch.no_grad()
def cobra_maps(model: CoBraNet, image: np.ndarray, tags: np.ndarray, settings: CAMSettings,
               device="cpu") -> CoBraMaps:  # fmt: skip
    """(4.17)/(4.18) multi-scale, flip-summed maps of one image at its own size, by the one CAM path."""
    settings = settings.replace(input_size=None)  # the official maps are at the image's own size
    raw = forward_pyramid(model, image_pyramid([image], settings, device, model.spec.mean, model.spec.std),
                          settings)  # fmt: skip
    h, w = image.shape[:2]
    present = torch.as_tensor(np.flatnonzero(tags), device=device)
    keys = np.concatenate([[0], np.flatnonzero(tags) + 1]).astype(np.int64)
    k = model.num_fg
    maps = []
    for size in ((h, w), ((h - 1) // 4 + 1, (w - 1) // 4 + 1)):
        summed = stack_maps(raw, size, settings).sum((0, 1))[0]  # ReLU'd on the grid; flips and scales summed
        maps += [normalize_maps(summed[present], "max"), normalize_maps(summed[k + present], "max"), summed[2 * k]]
    return CoBraMaps(keys, maps[0], maps[1], maps[2], maps[3], maps[4])


def write_ir_labels(model: CoBraNet, data: WSSSDataset, out: Path, settings: CAMSettings, percentile: float = 93.0,
                    fixed: tuple[float, float] | None = None, progress: bool = True, device="cpu") -> Path:  # fmt: skip
    """Stage 4 of §4.1: IR labels from ``M_fuse`` with (4.21) thresholds ``t_fg, t_bg`` and CRF row C.

    (4.21) reads the thresholds off the un-normalised class-token attention, whose scale grows with the ViT's
    depth and the number of scales and shrinks with the token count: calibrated for DeiT-S at 7 scales on VOC.
    ``fixed=(t_fg, t_bg)`` uses constants instead (IRN: 0.30, 0.05), for networks of other sizes.
    """
    for i, target in _missing(data, out, "IR labels", progress):
        sample = data[i]
        maps = cobra_maps(model, sample.image, _tags(data, i), settings, device)
        t_fg, t_bg = fixed or ir_thresholds(maps.attn, percentile)
        label = ir_labels(sample.image, maps.fused().cpu().numpy(), maps.keys, t_fg, t_bg)
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
def write_masks(model: CoBraNet, irn_path: Path, data: WSSSDataset, out: Path, settings: CAMSettings,
                rw_source: str = "tran", pad_size: int = 512, exp_times: int | None = None, progress: bool = True,
                device="cpu") -> Path:  # fmt: skip
    """Stages 6-7: random walk of ``M_tran^{/4}`` (or ``M_fuse``) on IRN's boundaries, (4.22), CRF row D.

    ``exp_times`` (default: the IRN checkpoint's, 8, i.e. ``T^256``) sets the walk length; 0 skips the walk.
    """
    if rw_source not in ("tran", "fuse"):
        raise ValueError(f"rw_source must be 'tran' or 'fuse', got {rw_source!r}")
    irn, cfg = load_irn(irn_path, device)
    for i, target in _missing(data, out, "masks", progress):
        sample = data[i]
        maps = cobra_maps(model, sample.image, _tags(data, i), settings, device)
        source = maps.tran4 if rw_source == "tran" else maps.fused(stride4=True)
        edge = irn.infer_edge(normalize_images(sample.image, device=device), pad_size)
        steps = cfg.exp_times if exp_times is None else exp_times
        rw = random_walk(source, edge, cfg.beta, steps, cfg.radius_infer) if steps else source
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


def cobra_masks(loaded: LoadedModel, data: WSSSDataset, out: str | Path, irn_preset: str = "paper",
                irn_epochs: int | None = None, irn_pretrained: str | None = None, rw_source: str = "tran",
                pad_size: int = 512, ir_thresholds_fixed: tuple[float, float] | None = None,
                rw_exp_times: int | None = None, seed: int = 0, device: str | None = None) -> Path:  # fmt: skip
    """The whole of §4.1 steps 4-7 for a CoBra network from ``load_model`` (ours or the official pair): IR labels,
    IRN, masks.

    IRN's ResNet has the CoBra CNN's architecture at output stride 16 (``strides=(1, 2, 2, 1)``, fixed BN);
    ``irn_preset`` "paper" is §4.10's schedule, "tiny" a CPU-sized one. Every stage runs on ``device`` (default:
    CUDA when there is one). Returns ``out/masks``.
    """
    out = Path(out)
    if loaded.spec.family != "cobra":
        raise ValueError(f"{loaded.report.source}: a {loaded.spec.family} network, not CoBra")
    check_classes(data, loaded.spec.class_names)
    device = select_device(device)
    model, settings = loaded.model.to(device), loaded.spec.cam
    trunk = cobra_irn_trunk(loaded.spec.arch["cnn"])
    preset = IRNConfig.tiny if irn_preset == "tiny" else IRNConfig
    cfg = preset(backbone=trunk, pretrained=irn_pretrained, num_classes=data.num_classes, device=str(device))
    if irn_epochs:
        cfg = replace(cfg, epochs=irn_epochs)
    write_ir_labels(model, data, out / "ir_labels", settings, fixed=ir_thresholds_fixed, device=device)
    irn = out / "irn.safetensors"
    if not irn.is_file():
        fit_irn(cfg, data, out / "ir_labels", irn, cobra=model, seed=seed)
    return write_masks(model, irn, data, out / "masks", settings, rw_source, pad_size, rw_exp_times, device=device)
