"""``wsss cam``: seeds (and dense-CRF masks) for every image of a dataset, as VOC palette PNGs."""

from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.datasets import Sample, WSSSDataset
from ..data.palette import colorize, save_label_png
from .infer import CAMSettings, predict_cams, refine_seed_crf


def _as_list(samples: list[Sample]) -> list[Sample]:
    return samples


def _crf_job(image: np.ndarray, seed: np.ndarray, tags: np.ndarray, path: Path) -> np.ndarray:
    mask = refine_seed_crf(image, seed, tags)
    save_label_png(path, mask)
    return mask


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
    cv2.imwrite(str(path), np.ascontiguousarray(strip[..., ::-1]))


def run_cam(
    model: torch.nn.Module,
    data: WSSSDataset,
    out: str | Path,
    settings: CAMSettings,
    refine: str = "none",
    batch_size: int = 16,
    workers: int = 2,
    device: str = "cpu",
    overlays: int = 0,
    progress: bool = True,
) -> dict:
    """Write ``out/seeds/ID.png`` (and ``out/masks/ID.png`` with ``refine="crf"``); return timing figures.

    Decoding runs in ``workers`` loader processes and the CRF in a pool of ``workers`` processes, overlapping
    the network; at most ``2 * workers`` CRF jobs are in flight so memory stays bounded.
    """
    if refine not in ("none", "crf"):
        raise ValueError(f"refine must be 'none' or 'crf', got {refine!r}")
    out = Path(out)
    for sub in ["seeds"] + (["masks"] if refine == "crf" else []) + (["overlays"] if overlays else []):
        (out / sub).mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_as_list)
    pool = ProcessPoolExecutor(max(workers, 1)) if refine == "crf" else None
    pending: deque[tuple[Future, Sample, np.ndarray]] = deque()
    cam_seconds, n_images, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=len(data), desc="cam", unit="img", disable=not progress, dynamic_ncols=True)

    overlay_ids = set(data.ids[:overlays])

    def drain(limit: int) -> None:
        while len(pending) > limit:
            future, sample, seed = pending.popleft()
            mask = future.result()
            if sample.id in overlay_ids:
                save_overlay(out / "overlays" / f"{sample.id}.png", sample, seed, mask)

    try:
        for samples in loader:
            tic = time.perf_counter()
            results = predict_cams(model, [s.image for s in samples], [s.labels for s in samples], settings, device)
            cam_seconds += time.perf_counter() - tic
            for sample, res in zip(samples, results, strict=True):
                save_label_png(out / "seeds" / f"{sample.id}.png", res.seed)
                if pool is not None:
                    args = (sample.image, res.seed, res.tags.numpy(), out / "masks" / f"{sample.id}.png")
                    pending.append((pool.submit(_crf_job, *args), sample, res.seed))
                elif sample.id in overlay_ids:
                    save_overlay(out / "overlays" / f"{sample.id}.png", sample, res.seed, None)
            drain(2 * max(workers, 1))
            n_images += len(samples)
            bar.update(len(samples))
        drain(0)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    total = time.perf_counter() - t0
    summary = {
        "images": n_images,
        "cam_images_per_s": n_images / cam_seconds if cam_seconds else float("nan"),
        "total_images_per_s": n_images / total if total else float("nan"),
        "refine": refine,
        "settings": {**settings.__dict__, "scales": list(settings.scales)},
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
