"""SEAM against its own baseline on the synthetic benchmark: val seed mIoU and context false activation.

Both train ``seam-tiny-synth``, the same trunk, crop, batch and steps: SEAM with its two views and every loss
(7.4)-(7.7), seeds from the PCM output; the baseline (``wsss.train.configs.SEAM_BASELINE``) with view 1 and the
classification loss only, seeds from the CAM ``Y``. Seeds come from one CAM path (§7.1 inference: 4 scales with
flips, background 0.26) for both. Training and scoring reuse ``seco_vs_cam.run`` (a finished run is reused, a run of
an edited config refused). ``--set`` overrides apply to both methods and need a ``--name``.

    python benchmarks/seam_vs_cam.py --data demo_out/synth --seeds 0 1 2 --val-images 100
    python benchmarks/seam_vs_cam.py --data demo_out/synth --set train.iters=60 --name short --seeds 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from seco_vs_cam import run

from common import write_result
from wsss.train.configs import SEAM_BASELINE

CONFIG = "seam-tiny-synth"
METHODS = {"seam": [], "baseline": SEAM_BASELINE}


def val_subset(data: Path, n: int) -> str:
    """The split of the first ``n`` val images, written next to ``val.txt`` (``val`` itself for ``n = 0``)."""
    if not n:
        return "val"
    splits = data / "ImageSets" / "Segmentation"
    ids = (splits / "val.txt").read_text().split()[:n]
    (splits / f"val_first{n}.txt").write_text("\n".join(ids) + "\n")
    return f"val_first{n}"


def summarise(per_seed: dict) -> dict:
    miou = [r["miou"] for r in per_seed.values()]
    fa = [r["context_false_activation"] for r in per_seed.values()]
    return {"miou_mean": float(np.mean(miou)), "miou_std": float(np.std(miou)), "context_fa_mean": float(np.mean(fa)),
            "context_fa_std": float(np.std(fa)), "miou_per_seed": miou, "context_fa_per_seed": fa}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/seam_vs_cam"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override (both)")
    parser.add_argument("--name", default="", help="variant name (required with --set)")
    parser.add_argument("--val-images", type=int, default=0, help="score the first N val images (0: all)")
    parser.add_argument("--result", default=None, help="results/RESULT.json (default: seam_vs_cam[_NAME])")
    args = parser.parse_args()
    if args.overrides and not args.name:
        parser.error("--set needs --name: a variant must not reuse the default runs")
    split = val_subset(args.data, args.val_images)
    rows, seconds = {m: {} for m in METHODS}, {m: {} for m in METHODS}
    for s in args.seeds:  # seed by seed, so that a cut-short run still pairs the two methods
        for method, extra in METHODS.items():
            name = "-".join(n for n in (args.name, "" if method == "seam" else method) if n)
            start = time.perf_counter()
            rows[method][s] = run(CONFIG, s, args.data, args.work, [*args.overrides, *extra], name, val_split=split)
            seconds[method][s] = round(time.perf_counter() - start, 1)
        report(args, rows, seconds, split)  # after every seed: a run cut short keeps what it measured


def report(args, rows: dict, seconds: dict, split: str) -> None:
    summary = {method: summarise(per_seed) for method, per_seed in rows.items() if per_seed}
    for method, sm in summary.items():
        print(f"{method:9s} val seed mIoU {100 * sm['miou_mean']:5.1f} +- {100 * sm['miou_std']:.1f} "
              f"({' / '.join(f'{100 * v:.1f}' for v in sm['miou_per_seed'])})   context false activation "
              f"{100 * sm['context_fa_mean']:5.1f} +- {100 * sm['context_fa_std']:.1f} "
              f"({' / '.join(f'{100 * v:.1f}' for v in sm['context_fa_per_seed'])})  "
              f"(seeds {sorted(rows[method])})")  # fmt: skip
    write_result(args.result or "seam_vs_cam" + (f"_{args.name}" if args.name else ""),
                 {"config": CONFIG, "seeds": sorted(rows["seam"]), "val_split": split, "overrides": args.overrides,
                  "baseline": SEAM_BASELINE, "summary": summary, "seconds_train_and_eval": seconds,
                  "runs": rows})  # fmt: skip


if __name__ == "__main__":
    main()
