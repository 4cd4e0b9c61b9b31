"""SC-CAM's rounds on the synthetic benchmark: val seed mIoU and context false activation of rounds 0..3.

Round 0 is the plain parent classifier (the baseline: the same backbone, budget and CAM post-processing without
sub-categories); rounds 1..3 each cluster the previous round's features and train a new network on (7.10). For each
seed one resumable ``train_rounds`` run (``wsss train --config sccam-tiny-synth``) is made (a finished run folder is
reused); every round's checkpoint then labels the val split with the config's CAM settings.

    python benchmarks/sccam_rounds.py --data demo_out/synth_small --seeds 0 1 2

with ``demo_out/synth_small`` made by ``SynthConfig(n_train=400, n_val=120, min_size=64, max_size=80)`` (the
benchmark's generator at a size a loaded 2-core machine trains 3 seeds x 4 rounds of in about half an hour).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from seco_vs_cam import _changed

from common import val_seed_scores, write_result
from wsss.data.datasets import VOCDataset
from wsss.models import load_model
from wsss.train.configs import get_config
from wsss.train.loop import CHECKPOINT
from wsss.train.sccam_rounds import LABELS, round_config, round_finished, train_rounds

CONFIG = "sccam-tiny-synth"


def evaluate_round(ckpt: Path, data: Path, out: Path, background: float | None = None) -> dict:
    """Val seeds of one round's checkpoint (at the config's background threshold, or ``background``): mIoU and the
    context false activation (overall and per class)."""
    scores = val_seed_scores(ckpt, data, out, background=background)
    keep = ("miou", "context_false_activation", "iou", "context_false_activation_per_class")
    return {k: scores[k] for k in keep}


def cluster_sizes(folder: Path, k: int) -> list[list[int]]:
    """Images per sub-category, per parent class, of a round's labels."""
    sub = np.load(folder / LABELS)["sub_labels"]
    return sub.sum(0).reshape(-1, k).astype(int).tolist()


def run(seed: int, data: Path, work: Path, overrides: list[str], extra: list[float], train: bool = True) -> dict:
    """Train (or, with ``train=False``, only find) the seed's rounds and evaluate every finished one."""
    cfg = get_config(CONFIG, overrides)
    out = work / f"{CONFIG}-s{seed}"
    if train:
        train_rounds(cfg, VOCDataset(data, "train"), out, seed=seed, resume=True, progress=False)
    rows = {}
    for r in range(cfg["sccam"]["rounds"] + 1):
        ckpt = out / f"round{r}" / CHECKPOINT
        if not round_finished(out / f"round{r}", cfg["train"]["iters"]):
            break
        stale = _changed(round_config(cfg, r, None)["model"], load_model(ckpt).meta["config"]["model"])
        if stale:  # a config edited since the run: never report a stale run
            raise SystemExit(f"{ckpt} was trained with another {CONFIG} model ({', '.join(stale)}); move it away")
        rows[r] = evaluate_round(ckpt, data, out / f"round{r}" / "val")
        rows[r]["other_backgrounds"] = {t: evaluate_round(ckpt, data, out / f"round{r}" / f"val_bg{t}", t)["miou"]
                                        for t in extra}  # fmt: skip
        if r > 0:
            rows[r]["cluster_sizes"] = cluster_sizes(out / f"round{r}", cfg["model"]["sub_k"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/sccam_rounds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--result", default="sccam_rounds", help="results/RESULT.json")
    parser.add_argument(
        "--also-backgrounds",
        type=float,
        nargs="*",
        default=[0.3, 0.5],
        help="further background thresholds whose val mIoU is reported too (not used to pick)",
    )
    parser.add_argument(
        "--only-finished",
        action="store_true",
        help="train nothing: report the rounds already finished in --work (a run cut short)",
    )
    args = parser.parse_args()
    runs = {s: run(s, args.data, args.work, args.overrides, args.also_backgrounds, not args.only_finished)
            for s in args.seeds}  # fmt: skip
    runs = {s: rows for s, rows in runs.items() if rows}
    seeds = sorted(runs)
    summary = {}
    for r in sorted({r for rows in runs.values() for r in rows}):
        have = [s for s in seeds if r in runs[s]]
        miou = [runs[s][r]["miou"] for s in have]
        fa = [runs[s][r]["context_false_activation"] for s in have]
        other = {t: float(np.mean([runs[s][r]["other_backgrounds"][t] for s in have]))
                 for t in args.also_backgrounds}  # fmt: skip
        summary[r] = {"miou_mean": float(np.mean(miou)), "miou_std": float(np.std(miou)),
                      "context_fa_mean": float(np.mean(fa)), "context_fa_std": float(np.std(fa)),
                      "miou_mean_at_background": other, "seeds": have}  # fmt: skip
        print(f"round {r}{' (plain CAM)' if r == 0 else '':12s} val seed mIoU {100 * np.mean(miou):5.1f} +- "
              f"{100 * np.std(miou):.1f}   context false activation {100 * np.mean(fa):5.1f} +- "
              f"{100 * np.std(fa):.1f}   mIoU at background "
              f"{', '.join(f'{t}: {100 * v:.1f}' for t, v in other.items())}  (seeds {have})")  # fmt: skip
    write_result(args.result, {"config": CONFIG, "seeds": args.seeds, "overrides": args.overrides,
                               "only_finished_rounds": args.only_finished, "summary": summary,
                               "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
