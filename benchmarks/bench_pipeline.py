"""Minutes per WSSS pipeline (SeCo, CoBra, CAM) at the paper configs, stage by stage, beside SeCo's Table 4.

The same API as ``wsss bench pipeline`` (``wsss.runtime.pipeline_bench``), on the synthetic benchmark's scenes
resized to 500x375 (the common VOC size; benchmarks/paper_shapes.py) with random weights:

    python benchmarks/bench_pipeline.py --device cuda                       # a GPU: the real figure
    nice -n 5 python benchmarks/bench_pipeline.py --warmup 1 --steps 1 --images 2 --warmup-images 1 \\
        --batch 2 --walk-exp-times 1                                          # this CPU: reduced, and labelled so
    python benchmarks/bench_pipeline.py --tiny --methods cam --steps 1 --images 2   # seconds: tiny configs

Writes ``results/bench_pipeline_<cpu|cuda>.json`` and the stacked-minutes chart beside it (``.png``); exits 1 when
a stage could not run (its error is in the JSON). After every stage the result so far is in ``NAME.partial.json``;
``--resume JSON`` reuses the stages an earlier (or interrupted) run measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from paper_shapes import make_data

from common import RESULTS, write_result
from wsss.data.datasets import VOCDataset
from wsss.runtime.pipeline_bench import PIPELINES, BenchOptions, bench_pipeline, plot_pipeline, table_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(PIPELINES))
    parser.add_argument("--device", default="cpu")
    defaults = BenchOptions()
    for name in ("warmup", "steps", "images", "warmup_images", "label_batch", "workers"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--official-warmup", type=int, default=None, help="The official style's (default: --warmup).")
    parser.add_argument("--batch", type=int, default=None, help="Training batch (default: the paper's).")
    parser.add_argument("--walk-exp-times", type=int, default=None, help="Random-walk squarings run (default 8).")
    parser.add_argument("--budget-s", type=float, default=None, help="Stages not started by then are not measured.")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs at the synthetic size (smoke runs).")
    parser.add_argument("--resume", type=Path, default=None, help="Reuse the stages this earlier result measured.")
    parser.add_argument("--json", type=Path, default=None, help="Results file (default: results/NAME.json).")
    args = parser.parse_args()
    opts = BenchOptions(warmup=args.warmup, official_warmup=args.official_warmup, steps=args.steps,
                        images=args.images, warmup_images=args.warmup_images, batch=args.batch,
                        walk_exp_times=args.walk_exp_times, label_batch=args.label_batch, workers=args.workers,
                        tiny=args.tiny, budget_s=args.budget_s)  # fmt: skip
    previous = json.loads(args.resume.read_text()) if args.resume else None
    name = f"bench_pipeline_{args.device.split(':')[0]}{'_tiny' if args.tiny else ''}"
    with tempfile.TemporaryDirectory(prefix="wsss-pipeline-data-") as tmp:
        n = max(args.images, args.warmup_images, (args.batch or 4) * 2, 2)
        if args.tiny:
            from wsss.data.synth import SynthConfig, generate_synth

            generate_synth(Path(tmp), SynthConfig(n_train=max(n, 16), n_val=n), progress=False)
        else:
            make_data(Path(tmp), n_train=max(n, 32 if args.device != "cpu" else n), n_val=n)
        partial = (args.json or RESULTS / f"{name}.json").with_suffix(".partial.json")
        result = bench_pipeline(VOCDataset(tmp, "train"), VOCDataset(tmp, "val"), args.methods.split(","),
                                args.device, opts, progress=lambda line: print(line, flush=True), previous=previous,
                                checkpoint=lambda so_far: partial.write_text(json.dumps(so_far, indent=2)))  # fmt: skip
    print("\n".join(table_lines(result)))
    write_result(name, {**result, "image_size": None if args.tiny else [500, 375]}, args.json)
    png = plot_pipeline(result, (args.json or RESULTS / f"{name}.json").with_suffix(".png"))
    print(f"wrote {png}")
    partial.unlink(missing_ok=True)
    if not all(m["complete"] for m in result["methods"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
