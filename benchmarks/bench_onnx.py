"""ONNX Runtime vs PyTorch eager for the exported CAM graph, per model, input size and batch.

Each network (random weights) is saved as a checkpoint with its spec and exported by ``wsss export``'s own path;
both backends come from ``open_backend``, as ``wsss label`` opens them.

python benchmarks/bench_onnx.py                       # ViT-Tiny/8 (demo) and ViT-B/16 (SeCo), CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import write_result
from wsss.export.run import run_export
from wsss.models import CAMSettings, ModelSpec, build_model, save_model
from wsss.runtime.backends import open_backend

MODELS = {  # backbone arch, input sizes (the first is the spec's CAM input size)
    "vit-tiny-p8 (demo)": ({"name": "vit_tiny_patch16_224", "img_size": 112,
                            "overrides": {"patch_size": 8, "depth": 4}}, [112, 224]),
    "vit-base-p16 (SeCo)": ({"name": "vit_base_patch16_224", "img_size": 224, "overrides": {}}, [224, 448]),
}  # fmt: skip
CLASSES = ("background", *(f"c{i}" for i in range(20)))


def backends(backbone: dict, input_size: int, tmp: Path) -> dict:
    """The torch and ONNX Runtime backends of one CAM network with random weights."""
    spec = ModelSpec("cam", {"backbone": backbone}, CLASSES, CAMSettings.for_family("cam", {"input_size": input_size}),
                     mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    ckpt = save_model(tmp / "m.safetensors", build_model(spec).eval(), spec)
    (onnx,) = run_export(ckpt, onnx_path=tmp / "m.onnx", echo=lambda _: None)
    return {"torch": open_backend(ckpt)[0], "onnxruntime": open_backend(engine=onnx)[0]}


def seconds(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    args = parser.parse_args()
    rows = []
    for name, (backbone, sizes) in MODELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            runners = backends(backbone, sizes[0], Path(tmp))
            for size in sizes:
                for batch in args.batches:
                    x = torch.randn(batch, 3, size, size)
                    t = {k: seconds(b, x, args.repeats) for k, b in runners.items()}
                    rows.append({"model": name, "size": size, "batch": batch, **{f"{k}_s": v for k, v in t.items()},
                                 "ort_speedup": t["torch"] / t["onnxruntime"]})  # fmt: skip
                    print(f"{name:20s} {size:4d}px x{batch}: torch {t['torch'] * 1e3:8.1f} ms  "
                          f"ORT {t['onnxruntime'] * 1e3:8.1f} ms  ({t['torch'] / t['onnxruntime']:.2f}x)")  # fmt: skip
    write_result("bench_onnx", {"rows": rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
