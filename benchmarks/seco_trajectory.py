"""Where along training a run's seeds leak onto context: per-class seed IoU and context false activation.

Trains ``--config`` in stages of ``--every`` iterations (each stage resumes the last; resume is bit-exact, so
the run is the same as an uninterrupted one), keeps each stage's checkpoint and scores validation seeds after it.
``--set`` overrides apply to the config (e.g. ``seco.schedule.lil=[10000,0.5]`` to switch a loss off); ``--init``
starts a variant from a stage of another run.

    python benchmarks/seco_trajectory.py --data demo_out/synth --seed 0 --every 30
    python benchmarks/seco_trajectory.py --data demo_out/synth --seed 0 --every 30 --name seco-s0-switch150 \\
        --set seco.cam2mask=150
    python benchmarks/seco_trajectory.py --data demo_out/synth --seed 0 --every 60 --name seco-s0-no-roi-switch \\
        --set seco.cam2mask=100000 --init runs/seco_trajectory/seco-s0-switch150/step00120
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import write_result
from wsss.data.datasets import VOCDataset
from wsss.eval.evaluate import evaluate_folders
from wsss.models import load_checkpoint
from wsss.runtime.backends import open_backend
from wsss.runtime.labeler import LabelConfig, label_dataset
from wsss.train.configs import get_config
from wsss.train.loop import CHECKPOINT, RESUME_STATE, train


def score(ckpt: Path, data: Path, out: Path) -> dict:
    """Validation seeds of ``ckpt`` with its own CAM settings: mIoU, per-class IoU and precision, context false
    activation per class."""
    backend, spec, meta = open_backend(ckpt)
    val = VOCDataset(data, "val")
    label_dataset(backend, spec, meta, val, out, LabelConfig(spec.cam, seed_dir="seeds", label_dir=None, quiet=True,
                                                             resume=True))  # fmt: skip
    names = list(spec.class_names)
    res = evaluate_folders(out / "seeds", data / "SegmentationClass", names, context_dir=data / "ContextMask",
                           ids=val.ids)  # fmt: skip
    return {"miou": res["miou"], "context_false_activation": res["context_false_activation"],
            "iou": dict(zip(names, res["iou"], strict=True)),
            "precision": dict(zip(names, res["precision"], strict=True))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", default="seco-tiny-synth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default=None, help="run and results name (default: config-sSEED)")
    parser.add_argument("--init", type=Path, default=None,
                        help="a stage folder of another run: start from its checkpoint and state (a variant that "
                             "differs only after that step)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("runs/seco_trajectory"))
    args = parser.parse_args()
    if args.overrides and not args.name:
        parser.error("--set needs --name: a variant must not reuse the run folder of the plain config")
    cfg = get_config(args.config, args.overrides)
    name = args.name or f"{args.config}-s{args.seed}"
    run, data = args.work / name, VOCDataset(args.data, "train")
    names = data.classes
    start = 0
    if args.init is not None:
        start = load_checkpoint(args.init / CHECKPOINT)[1]["step"]
        if not (run / CHECKPOINT).is_file():
            run.mkdir(parents=True, exist_ok=True)
            for file in (CHECKPOINT, RESUME_STATE):
                shutil.copy2(args.init / file, run / file)
    rows = []
    for stop in range(start + args.every, cfg["train"]["iters"] + 1, args.every):
        stage = run / f"step{stop:05d}"
        if not (stage / CHECKPOINT).is_file():
            train(cfg, data, run, seed=args.seed, resume=(run / CHECKPOINT).is_file(), progress=False,
                  max_steps=stop)  # fmt: skip
            stage.mkdir(parents=True, exist_ok=True)
            for file in (CHECKPOINT, RESUME_STATE):  # a stage can seed a variant run (copy both into a new run folder)
                shutil.copy2(run / file, stage / file)
        row = {"step": stop, **score(stage / CHECKPOINT, args.data, stage / "val")}
        rows.append(row)
        fa = row["context_false_activation"]
        ctx = {names[int(k)]: round(100 * v, 1) for k, v in fa["per_class"].items()}
        ctx["all"] = round(100 * fa["overall"], 1)
        iou = " ".join(f"{k[:5]} {100 * v:4.1f}" for k, v in row["iou"].items())
        print(f"step {stop:4d}  mIoU {100 * row['miou']:5.1f}  context FA {json.dumps(ctx)}  IoU {iou}", flush=True)
    write_result(f"seco_trajectory_{name}", {"config": args.config, "seed": args.seed, "overrides": args.overrides,
                                             "stages": rows})  # fmt: skip


if __name__ == "__main__":
    main()
