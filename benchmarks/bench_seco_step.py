"""Seconds per SeCo training step and peak memory: our vectorised losses against loop-style ones.

Each step is the training loop's own (``wsss.train.loop.train_step``): bf16 autocast on CUDA when the config asks
for AMP (as training runs it), float32 on the CPU. The loop-style variant swaps in per-row transcriptions of LIL
and LIG and a per-image affinity mask, the way the official code computes them (Python loops with host syncs),
everything else unchanged.

    python benchmarks/bench_seco_step.py --config seco-tiny-synth --data demo_out/synth --steps 5
    python benchmarks/bench_seco_step.py --config seco-vitb16-voc --data VOC2012 --device cuda   # on a GPU
    python benchmarks/bench_seco_step.py --quick --data demo_out/synth   # seconds: a micro network, 2 steps
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from common import add_json_option, write_result
from wsss.data.datasets import VOCDataset
from wsss.train.configs import get_config
from wsss.train.loop import _batches, build_training, train_step, training_set
from wsss.train.official_loops import official_losses

# --quick: a micro SeCo (3 blocks of width 48 at 48 px) with every term on from the first timed step
QUICK = [
    'model.backbone.overrides={"patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2}',
    "model.backbone.img_size=48",
    "data.crop=48",
    "data.cache_images=false",
    "train.batch_size=2",
    "seco.n_crops=2",
    "seco.local_crop=16",
    "seco.queue=32",
    "seco.proj_hidden=32",
]


def time_steps(cfg, data, device, steps: int, loop_style: bool) -> dict:
    with official_losses("seco") if loop_style else contextlib.nullcontext():
        torch.manual_seed(0)
        _, model, objective, optim = build_training(cfg, data.classes, device, verbose=False)
        batches = _batches(training_set(cfg, data, 0), cfg["train"], 0, 0, 1, 0, pin=device.type == "cuda")
        amp = cfg["train"]["amp"] and device.type == "cuda"  # as the training loop decides
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(steps + 1):  # the first step warms up
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            tic = time.perf_counter()
            train_step(model, objective, optim, batch, step + 100_000, amp)  # every term on
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tic)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        return {"s_per_step": sum(times[1:]) / steps, "peak_mib": peak, "precision": "bf16-autocast" if amp else "fp32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="seco-tiny-synth")
    parser.add_argument("--data", type=Path, required=True, help="VOC-layout root (e.g. the synthetic benchmark)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a micro network and 2 steps (seconds on a CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_json_option(parser)
    args = parser.parse_args()
    quick = QUICK if args.quick else []
    cfg = get_config(args.config, ["pretrained=null", *quick, *args.overrides])
    steps = 2 if args.quick else args.steps
    data, device = VOCDataset(args.data, args.split), torch.device(args.device)
    ours = time_steps(cfg, data, device, steps, loop_style=False)
    loops = time_steps(cfg, data, device, steps, loop_style=True)
    ratio = loops["s_per_step"] / ours["s_per_step"]
    print(f"{args.config}{' (quick)' if args.quick else ''} on {device}, {ours['precision']}: vectorised "
          f"{ours['s_per_step']:.3f} s/step, loop-style {loops['s_per_step']:.3f} s/step ({ratio:.2f}x)")  # fmt: skip
    write_result(f"bench_seco_step_{args.config}_{device.type}{'_quick' if args.quick else ''}",
                 {"config": args.config, "quick": args.quick, "overrides": [*quick, *args.overrides], "steps": steps,
                  "vectorised": ours, "loop_style": loops, "ratio": ratio}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
