"""SeCo against the plain-CAM baseline on the synthetic benchmark: seed mIoU and context false activation.

Trains ``cam-tiny-synth`` and ``seco-tiny-synth`` for each seed (a finished run folder is reused), computes
validation seeds with the same CAM post-processing, and reports the mean over seeds. ``--set`` overrides apply to
one method's config (``--variant-of``, SeCo unless told) and need a ``--name``: that method's run folders and the
result file carry it, while the other method's runs are shared. ``--both`` overrides and ``--iters`` (the schedule
scaled alike, ``with_iters``) apply to both methods, whose runs then both carry the name.

    python benchmarks/seco_vs_cam.py --data demo_out/synth --seeds 0 1 2
    python benchmarks/seco_vs_cam.py --data demo_out/synth --set seco.cam2mask=150 --name switch150
    python benchmarks/seco_vs_cam.py --data demo_out/synth --variant-of cam --set model.pooling=gap --name gap --seeds 0
    python benchmarks/seco_vs_cam.py --data demo_out/synth --iters 100 --both train.batch_size=8 --name demo100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import RESULTS, method_chart, val_seed_scores, write_result
from wsss.data.datasets import VOCDataset
from wsss.models import load_model
from wsss.train.configs import get_config, with_iters
from wsss.train.loop import CHECKPOINT, train

METHODS = ("cam-tiny-synth", "seco-tiny-synth")


def run(config: str, seed: int, data: Path, work: Path, overrides: list[str] = (), name: str = "",
        iters: int | None = None, val_split: str = "val") -> dict:  # fmt: skip
    cfg = get_config(config, overrides)
    cfg = with_iters(cfg, iters) if iters else cfg
    out = work / f"{config}{'-' + name if name else ''}-s{seed}"
    if not (out / CHECKPOINT).is_file():
        train(cfg, VOCDataset(data, "train"), out, seed=seed, progress=False)
    stale = _changed(json.loads(json.dumps(cfg)), load_model(out / CHECKPOINT).meta["config"])
    if stale:  # a config edited since the run: never report a stale run
        raise SystemExit(f"{out} was trained with another {config} config ({', '.join(stale)}); move it away")
    scores = val_seed_scores(out / CHECKPOINT, data, out / "val", val_split)
    return {key: scores[key] for key in ("miou", "context_false_activation", "iou", "precision",
                                         "context_false_activation_per_class")}  # fmt: skip


def _changed(wanted: dict, trained: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ; keys the trained config lacks (settings added to the code since) are skipped."""
    diff = []
    for key, value in wanted.items():
        if key not in trained:
            continue
        if isinstance(value, dict) and isinstance(trained[key], dict):
            diff += _changed(value, trained[key], f"{prefix}{key}.")
        elif value != trained[key]:
            diff.append(prefix + key)
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/seco_vs_cam"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--variant-of", choices=("seco", "cam"), default="seco", help="the config --set applies to")
    parser.add_argument("--name", default="", help="variant name (required with --set, --both and --iters)")
    parser.add_argument("--both", action="append", default=[], help="config override for both methods")
    parser.add_argument("--iters", type=int, default=None, help="both methods' iterations, schedules scaled alike")
    parser.add_argument("--result", default=None, help="results/RESULT.json (default: seco_vs_cam[_NAME])")
    parser.add_argument("--plot", type=Path, default=None, help="only redraw the PNG of this results JSON")
    args = parser.parse_args()
    if args.plot:
        method_chart(args.plot.with_suffix(".png"), args.plot.stem, json.loads(args.plot.read_text())["runs"])
        return
    if (args.overrides or args.both or args.iters) and not args.name:
        parser.error("--set, --both and --iters need --name: a variant must not reuse the default runs")
    rows = {}
    for method in METHODS:
        variant = method.startswith(args.variant_of + "-")
        overrides = [*args.both, *(args.overrides if variant else ())]
        name = args.name if variant or args.both or args.iters else ""
        rows[method] = {s: run(method, s, args.data, args.work, overrides, name, args.iters) for s in args.seeds}
    summary = {}
    for method, per_seed in rows.items():
        miou = [r["miou"] for r in per_seed.values()]
        fa = [r["context_false_activation"] for r in per_seed.values()]
        per_class = {c: float(np.mean([r["context_false_activation_per_class"][c] for r in per_seed.values()]))
                     for c in next(iter(per_seed.values()))["context_false_activation_per_class"]}  # fmt: skip
        summary[method] = {"miou_mean": float(np.mean(miou)), "miou_std": float(np.std(miou)),
                           "context_fa_mean": float(np.mean(fa)), "context_fa_std": float(np.std(fa)),
                           "context_fa_per_class_mean": per_class}  # fmt: skip
        by_class = ", ".join(f"{c} {100 * v:.1f}" for c, v in per_class.items())
        print(
            f"{method:16s} val seed mIoU {100 * np.mean(miou):5.1f} +- {100 * np.std(miou):.1f}   "
            f"context false activation {100 * np.mean(fa):5.1f} +- {100 * np.std(fa):.1f} ({by_class})"
            f"  (seeds {args.seeds})"
        )
    result = args.result or "seco_vs_cam" + (f"_{args.name}" if args.name else "")
    method_chart(RESULTS / f"{result}.png", result, rows)
    write_result(
        result,
        {
            "seeds": args.seeds,
            "variant_of": args.variant_of,
            "overrides": args.overrides,
            "summary": summary,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
