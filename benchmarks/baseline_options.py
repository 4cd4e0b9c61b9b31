"""Which tiny baseline gives the demo decent CAMs in its CPU budget? Train each option, sweep the threshold.

Options: a patch-stem ViT from scratch, a conv-stem ViT from scratch, and the patch-stem ViT started from the
shipped backbone (pre-trained on the "broad" synthetic corpus, a different generator seed and class set).
Each trains ``--iters`` steps of ``cam-tiny-synth``; seeds are scored on the synthetic *val* split over a sweep of
background thresholds, the threshold being picked on *train* seeds (the field's convention for seed tuning).

    python benchmarks/baseline_options.py --data demo_out/synth --iters 250
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common import write_result
from wsss.cam.labels import cam_to_label
from wsss.cam.pipeline import CAMResult, predict_cams
from wsss.data.datasets import Sample, VOCDataset
from wsss.eval.metrics import ConfusionMatrix
from wsss.models import LoadedModel, load_model
from wsss.models.spec import CAMSettings
from wsss.train.configs import get_config
from wsss.train.loop import train

OPTIONS = {
    "scratch-patch": ["pretrained=null"],
    "scratch-conv": ["pretrained=null", "model.backbone.stem=conv"],
    "pretrained-patch": [],
}
THRESHOLDS = [round(t, 2) for t in np.arange(0.1, 0.65, 0.05)]


def cam_pass(loaded: LoadedModel, data: VOCDataset, limit: int,
             settings: CAMSettings | None = None) -> Iterator[tuple[Sample, CAMResult]]:  # fmt: skip
    """(sample, its CAMs and seed) for the first ``limit`` images: multi-scale CAMs with ``settings`` (by default
    the network's CAM settings), in batches of 16."""
    spec = loaded.spec
    settings = settings or spec.cam
    n = min(len(data), limit)
    for start in range(0, n, 16):
        samples = [data[i] for i in range(start, min(start + 16, n))]
        results = predict_cams(loaded.model, [s.image for s in samples], [s.labels for s in samples], settings,
                               mean=spec.mean, std=spec.std)  # fmt: skip
        yield from zip(samples, results, strict=True)


def seed_miou_curve(loaded: LoadedModel, data: VOCDataset, limit: int,
                    settings: CAMSettings | None = None) -> list[float]:  # fmt: skip
    """Seed mIoU at every threshold of THRESHOLDS from one pass of multi-scale CAMs (``settings``, by default the
    network's)."""
    matrices = [ConfusionMatrix(data.num_classes) for _ in THRESHOLDS]
    for s, r in cam_pass(loaded, data, limit, settings):
        for t, cm in zip(THRESHOLDS, matrices, strict=True):
            cm.update(cam_to_label(r.cam[None], r.tags[None], t)[1][0], torch.from_numpy(s.mask))
    return [cm.compute()["miou"] for cm in matrices]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic benchmark root (wsss data synth)")
    parser.add_argument("--out", type=Path, default=Path("runs/baseline_options"))
    parser.add_argument("--iters", type=int, default=250)
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--options", nargs="*", default=list(OPTIONS))
    args = parser.parse_args()
    train_set, val_set = VOCDataset(args.data, "train"), VOCDataset(args.data, "val")
    rows = {}
    for name in args.options:
        cfg = get_config("cam-tiny-synth", [*OPTIONS[name], f"train.iters={args.iters}"])
        tic = time.perf_counter()
        ckpt = train(cfg, train_set, args.out / name, progress=False)
        train_s = time.perf_counter() - tic
        loaded = load_model(ckpt)
        train_curve = seed_miou_curve(loaded, train_set, args.eval_images)
        val_curve = seed_miou_curve(loaded, val_set, args.eval_images)
        best = int(np.argmax(train_curve))
        rows[name] = {
            "train_seconds": round(train_s, 1), "iters": args.iters, "threshold": THRESHOLDS[best],
            "train_seed_miou": train_curve[best], "val_seed_miou": val_curve[best],
            "val_curve": dict(zip(map(str, THRESHOLDS), val_curve, strict=True)),
        }  # fmt: skip
        print(f"{name:18s} train {train_s:6.1f}s  thr {THRESHOLDS[best]:.2f}  "
              f"train seeds {100 * train_curve[best]:5.1f}  val seeds {100 * val_curve[best]:5.1f}")  # fmt: skip
    write_result("baseline_options", {"args": {k: str(v) for k, v in vars(args).items()}, "options": rows})


if __name__ == "__main__":
    main()
