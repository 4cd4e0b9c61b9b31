"""ONNX Runtime vs PyTorch eager for the exported CAM graph, per model, input size and batch.

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
from wsss.export.onnx import export_onnx
from wsss.models import CAMNet
from wsss.models.backbone import BackboneConfig
from wsss.runtime.backends import OnnxBackend, TorchBackend

MODELS = {
    "vit-tiny-p8 (demo)": (BackboneConfig("vit_tiny_patch16_224", 112, {"patch_size": 8, "depth": 4}), [112, 224]),
    "vit-base-p16 (SeCo)": (BackboneConfig("vit_base_patch16_224", 224, {}), [224, 448]),
}


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
        model = CAMNet(backbone, 20).eval()
        meta = {"method": "cam", "class_names": ["background"] + [f"c{i}" for i in range(20)], "mean": [0.5] * 3,
                "std": [0.5] * 3, "config": {"cam": {"input_size": sizes[0]}}}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, meta, Path(tmp) / "m.onnx").path
            backends = {"torch": TorchBackend(model), "onnxruntime": OnnxBackend(path)}
            for size in sizes:
                for batch in args.batches:
                    x = torch.randn(batch, 3, size, size)
                    t = {k: seconds(b, x, args.repeats) for k, b in backends.items()}
                    rows.append({"model": name, "size": size, "batch": batch, **{f"{k}_s": v for k, v in t.items()},
                                 "ort_speedup": t["torch"] / t["onnxruntime"]})  # fmt: skip
                    print(f"{name:20s} {size:4d}px x{batch}: torch {t['torch'] * 1e3:8.1f} ms  "
                          f"ORT {t['onnxruntime'] * 1e3:8.1f} ms  ({t['torch'] / t['onnxruntime']:.2f}x)")  # fmt: skip
    write_result("bench_onnx", {"rows": rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
