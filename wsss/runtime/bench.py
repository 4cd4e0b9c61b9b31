"""``wsss bench label``: the batch labeler against the research-code way of doing the same work.

The baseline is what research repositories do: one image at a time through PyTorch eager, the dense CRF in the
same process, then the PNG written, with no overlap between stages.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..cam.crf import refine_seed_crf
from ..cam.pipeline import predict_cams
from ..data.datasets import WSSSDataset
from ..data.palette import save_label_png
from ..models import CAMSettings, load_model
from .backends import TorchBackend, open_backend
from .labeler import LabelConfig, label_dataset


def device_info() -> dict:
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "wsss": __version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class Subset(WSSSDataset):
    """The first ``n`` items of a dataset."""

    def __init__(self, data: WSSSDataset, n: int):
        n = min(n, len(data))
        super().__init__(data.classes, data.ids[:n], [data.image_path(i) for i in range(n)],
                         [data.mask_path(i) for i in range(n)], {k: data.labels(i) for i, k in
                                                                  enumerate(data.ids[:n])})  # fmt: skip


def research_baseline(backend: TorchBackend, data: WSSSDataset, settings: CAMSettings, refine: str, out: Path) -> float:
    """Seconds for the one-image-at-a-time loop (decode, CAM, CRF, write)."""
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    for i in tqdm(range(len(data)), desc="baseline", leave=False):
        sample = data[i]
        res = predict_cams(backend, [sample.image], [sample.labels], settings, backend.device, backend.spec.mean,
                           backend.spec.std)[0]  # fmt: skip
        label = refine_seed_crf(sample.image, res.seed, res.tags.numpy()) if refine == "crf" else res.seed
        save_label_png(out / f"{sample.id}.png", label)
    return time.perf_counter() - tic


def bench_label(
    ckpt: Path, data: WSSSDataset, scales: tuple[float, ...] | None, images: int, batches: list[int],
    backends: list[str], refine: str = "crf", workers: int = 2, device: str = "cpu", vit_ckpt: Path | None = None,
) -> dict:  # fmt: skip
    """Images/second of the baseline and of the labeler per backend and batch size, with the checkpoint's CAM
    settings (``scales`` overrides its scales)."""
    data = Subset(data, images)
    loaded = load_model(ckpt, vit_path=vit_ckpt)
    settings = loaded.spec.cam.override(scales=scales)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engines = {}
        if "onnx" in backends:  # exported on the CPU, before the network moves to ``device``
            from ..export.onnx import export_onnx

            path = export_onnx(loaded.model, loaded.spec, tmp / "cam.onnx", meta=loaded.meta).path
            backend, _, meta = open_backend(engine=path, device=device)
            engines["onnx"] = (backend, meta)
        torch_backend = TorchBackend(loaded.model, device, spec=loaded.spec)
        engines["torch"] = (torch_backend, loaded.meta)
        seconds = research_baseline(torch_backend, data, settings, refine, tmp / "baseline")
        rows.append({"pipeline": "research loop", "backend": "torch", "batch": 1, "workers": 0,
                     "images_per_s": len(data) / seconds})  # fmt: skip
        for name in backends:
            backend, backend_meta = engines[name]
            for batch in batches:
                cfg = replace(LabelConfig(settings, refine), batch=batch, workers=workers, quiet=True)
                summary = label_dataset(backend, backend.spec, backend_meta, data, tmp / f"{name}-{batch}", cfg)
                rows.append({"pipeline": "wsss label", "backend": name, "batch": batch, "workers": workers,
                             "images_per_s": summary["images_per_s"], "stages_s": summary["stages_s"]})  # fmt: skip
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    return {
        "images": len(data),
        "refine": refine,
        "settings": settings.to_dict(),
        "rows": rows,
        "device": device_info(),
    }
