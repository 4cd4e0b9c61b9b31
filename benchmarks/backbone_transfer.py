"""Does a pre-trained tiny backbone transfer? ``cam-tiny-synth`` started from it, scored on a benchmark's val seeds.

The downstream check of ``pretrain_backbone.py``: the demo recipe (250 steps of batch 32) with ``pretrained=WEIGHTS``
for each seed, the val seeds labelled and scored as in ``seco_vs_cam.py`` (seed mIoU, context false activation).
The shipped backbone gives 72.3 / 76.5 / 76.6% on the demo set's seeds 0 / 1 / 2 (``results/seco_vs_cam.json``).

    wsss data synth /tmp/corpus_demo
    python benchmarks/backbone_transfer.py --weights runs/pretrain_broad2/vit-tiny-synth.safetensors \\
        --data /tmp/corpus_demo --name broad2 --seeds 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from seco_vs_cam import run

from common import write_result
from wsss.models import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="backbone file (pretrain_backbone.py) or builtin:NAME")
    parser.add_argument("--data", type=Path, required=True, help="benchmark root in VOC layout with ContextMask/")
    parser.add_argument("--name", required=True, help="names the run folders and results/backbone_transfer_NAME.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--work", type=Path, default=Path("runs/backbone_transfer"))
    args = parser.parse_args()
    runs = {s: run("cam-tiny-synth", s, args.data, args.work, [f"pretrained={args.weights}"], args.name)
            for s in args.seeds}  # fmt: skip
    miou = [r["miou"] for r in runs.values()]
    per_seed = ", ".join(f"seed {s} {100 * r['miou']:.1f}" for s, r in runs.items())
    print(
        f"{args.name}: val seed mIoU {100 * np.mean(miou):.1f} +- {100 * np.std(miou):.1f} ({per_seed}) on {args.data}"
    )
    meta = {} if args.weights.startswith("builtin:") else load_checkpoint(args.weights)[1]
    provenance = {k: meta[k] for k in ("corpus", "iters", "command") if k in meta}
    write_result(f"backbone_transfer_{args.name}", {"weights": args.weights, "weights_provenance": provenance,
                                                    "data": str(args.data), "miou_mean": float(np.mean(miou)),
                                                    "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
