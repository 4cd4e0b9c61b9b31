"""``wsss bench label``: the batch labeler against the research-code way of doing the same work.

The baseline is what research repositories do: one image at a time through PyTorch eager, the dense CRF in the
same process, then the PNG written, with no overlap between stages.
"""

from __future__ import annotations

import itertools
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
from .backends import TorchBackend, open_backend, select_device
from .labeler import LabelConfig, label_dataset


def device_info(device: str | None = None) -> dict:
    """The machine; the GPU named is ``device``'s when it is a CUDA device, else the current one."""
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "wsss": __version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }  # fmt: skip
    if device is not None:
        info["device"] = str(device)
    if torch.cuda.is_available():
        gpu = torch.device(device or "cuda")
        info["gpu"] = torch.cuda.get_device_name(gpu if gpu.type == "cuda" else None)
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
    precision: str = "fp32", crf_impls: tuple[str, ...] = ("auto",),
) -> dict:  # fmt: skip
    """Images/second of the baseline and of the labeler per backend, batch size and CRF implementation (with
    ``refine="crf"``), with the checkpoint's CAM settings (``scales`` overrides its scales); ``precision`` is the
    labeler's (the baseline runs fp32 with pydensecrf). Each labeler row carries its stage timeline."""
    if "trt" in backends:
        raise ValueError("bench label builds no TensorRT engine: bench onnx-trt, or label with --engine M.engine")
    data = Subset(data, images)
    loaded = load_model(ckpt, vit_path=vit_ckpt)
    settings = loaded.spec.cam.override(scales=scales)
    torch_backend = TorchBackend(loaded.model, select_device(device), spec=loaded.spec)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engines = {"torch": (torch_backend, loaded.meta)}
        exported = [name for name in backends if name != "torch"]
        if exported:  # traced from a CPU copy of the network, which stays on ``device``
            from ..export.onnx import export_onnx

            path = export_onnx(torch_backend.model, loaded.spec, tmp / "cam.onnx", meta=loaded.meta).path
            for name in exported:
                backend, _, meta = open_backend(engine=path, backend=name, device=device)
                engines[name] = (backend, meta)
        seconds = research_baseline(torch_backend, data, settings, refine, tmp / "baseline")
        rows.append({"pipeline": "research loop", "backend": "torch", "batch": 1, "workers": 0,
                     "crf_impl": "pydensecrf" if refine == "crf" else None,
                     "images_per_s": len(data) / seconds})  # fmt: skip
        for name, batch, impl in itertools.product(backends, batches, crf_impls if refine == "crf" else ["auto"]):
            backend, backend_meta = engines[name]
            cfg = replace(LabelConfig(settings, refine), batch=batch, workers=workers, quiet=True, precision=precision,
                          crf_impl=impl)  # fmt: skip
            summary = label_dataset(backend, backend.spec, backend_meta, data, tmp / f"{name}-{batch}-{impl}", cfg)
            rows.append({"pipeline": "wsss label", "backend": name, "batch": batch, "workers": workers,
                         "precision": precision, "crf_impl": summary["crf_impl"],
                         "images_per_s": summary["images_per_s"], "stages_s": summary["stages_s"],
                         "timeline": summary["timeline"]})  # fmt: skip
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    return {
        "images": len(data),
        "refine": refine,
        "settings": settings.to_dict(),
        "rows": rows,
        "device": device_info(device),
    }
