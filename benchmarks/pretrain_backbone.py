"""Pre-train the tiny ViT backbone shipped as ``wsss/models/weights/vit-tiny-synth.safetensors``.

The stand-in for ImageNet weights on the CPU demo: a multi-label CAM classifier trained on a synthetic corpus
(generator seed 1; none of its classes is a demo class). Only the backbone is kept, in fp16, with its provenance
(corpus, seed, iterations, command) in the metadata. The shipped file came from the "broad" corpus (24 classes, each
a fixed shape x texture x colour; issue 20: the colour shortcut does not transfer); the default is now "broad2"
(shape, texture and shape+texture classes in random colours per instance), written to runs/ until it is chosen.
The default teacher is the corpus's masks (config ``cam-tiny-pretrain``: the tag loss plus a per-token CAM loss);
``--supervision tags`` trains the same config on the tags alone, as the shipped file was.

    python benchmarks/pretrain_backbone.py --iters 2000                    # broad2; about 35 min on 2 shared cores
    python benchmarks/pretrain_backbone.py --corpus broad --out wsss/models/weights/vit-tiny-synth.safetensors
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from common import write_result
from wsss.data.datasets import VOCDataset
from wsss.data.synth import SynthConfig, generate_synth
from wsss.models import load_checkpoint, load_model, save_checkpoint, spec_from_meta
from wsss.train.configs import get_config
from wsss.train.loop import train, validate

# The corpora's image sizes and object counts: broad as the shipped file was made, broad2 smaller and busier.
CORPUS_SIZES = {"broad": {}, "broad2": {"min_size": 48, "max_size": 128, "max_objects": 4}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(CORPUS_SIZES), default="broad2")
    parser.add_argument("--seed", type=int, default=1, help="Generator seed of the corpus.")
    parser.add_argument("--work", type=Path, default=None, help="Default: runs/pretrain_CORPUS.")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--out", type=Path, default=None, help="Default: WORK/vit-tiny-synth.safetensors.")
    parser.add_argument("--resume", action="store_true", help="Continue WORK/run after an interruption (SIGTERM).")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="Stop (and export) at this step, the LR schedule still that of --iters.")  # fmt: skip
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--supervision", choices=("masks", "tags"), default="masks",
                        help="masks: cam-tiny-pretrain (taught by the masks); tags: image tags only.")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(f"runs/pretrain_{args.corpus}")
    out = args.out or work / "vit-tiny-synth.safetensors"

    corpus = work / args.corpus
    synth = SynthConfig(n_train=args.images, n_val=300, seed=args.seed, corpus=args.corpus, **CORPUS_SIZES[args.corpus])
    if not corpus_is_generated(corpus, synth):  # a rerun with other iterations reuses the corpus
        generate_synth(corpus, synth)
    cfg = get_config(
        "cam-tiny-pretrain", [f"supervision={args.supervision}", f"train.iters={args.iters}", *args.overrides]
    )
    tic = time.perf_counter()
    ckpt = train(cfg, VOCDataset(corpus, "train"), work / "run", progress=True, resume=args.resume,
                 max_steps=args.max_steps)  # fmt: skip
    seconds = time.perf_counter() - tic  # this invocation's share only, when it resumed
    command = shlex.join(["python", *sys.argv])
    provenance = {"corpus": synth.__dict__, "seed": args.seed, "iters": args.iters, "train_seconds": seconds,
                  "supervision": args.supervision, "overrides": args.overrides, "command": command}  # fmt: skip
    loaded = load_model(ckpt)
    provenance["steps"] = loaded.meta["step"]  # fewer than iters when stopped by --max-steps
    export_backbone(ckpt, out, provenance)

    val = validate(loaded.model, VOCDataset(corpus, "val"), loaded.spec, "cpu", args.val_images)
    name = "pretrain_backbone" if args.corpus == "broad" else f"pretrain_backbone_{args.corpus}"
    write_result(name, {**provenance, "corpus_val": val, "file": str(out), "bytes": out.stat().st_size})


def corpus_is_generated(root: Path, synth: SynthConfig) -> bool:
    stats = root / "synth_stats.json"
    return stats.is_file() and json.loads(stats.read_text()).get("config") == synth.__dict__


def export_backbone(ckpt: Path, out: Path, provenance: dict) -> None:
    """Keep the ``backbone.*`` tensors of a CAM checkpoint, in fp16, under timm's own key names."""
    state, meta = load_checkpoint(ckpt)
    backbone = {k.removeprefix("backbone."): v.half() for k, v in state.items() if k.startswith("backbone.")}
    arch = spec_from_meta(meta, ckpt).arch["backbone"]
    save_checkpoint(out, backbone, {"kind": "backbone", "model": arch, **provenance})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {sum(v.numel() for v in backbone.values())} params)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
