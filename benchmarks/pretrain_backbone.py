"""Pre-train the tiny ViT backbone shipped as ``wsss/models/weights/vit-tiny-synth.safetensors``.

The stand-in for ImageNet weights on the CPU demo: a multi-label CAM classifier trained on the "broad" synthetic
corpus (generator seed 1, 24 random shape x texture x colour classes; none is a demo class). Only the backbone is
kept, in fp16, with its provenance in the metadata.

    python benchmarks/pretrain_backbone.py --iters 2000     # about 30 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import write_result
from wsss.data.datasets import VOCDataset
from wsss.data.synth import SynthConfig, generate_synth
from wsss.models import load_checkpoint, load_model, save_checkpoint, spec_from_meta
from wsss.models.loading import BUILTIN_WEIGHTS
from wsss.train.configs import get_config
from wsss.train.loop import train, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/pretrain"))
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=BUILTIN_WEIGHTS / "vit-tiny-synth.safetensors")
    args = parser.parse_args()

    corpus = args.work / "broad"
    synth = SynthConfig(n_train=args.images, n_val=300, seed=1, corpus="broad")
    generate_synth(corpus, synth)
    cfg = get_config("cam-tiny-synth", ["pretrained=null", f"train.iters={args.iters}", "optim.lr=5e-4",
                                        "optim.warmup=100", "train.log_every=50", "train.ckpt_every=250"])  # fmt: skip
    tic = time.perf_counter()
    ckpt = train(cfg, VOCDataset(corpus, "train"), args.work / "run", progress=True)
    seconds = time.perf_counter() - tic
    export_backbone(ckpt, args.out, {"corpus": synth.__dict__, "iters": args.iters, "train_seconds": seconds})

    loaded = load_model(ckpt)
    val = validate(loaded.model, VOCDataset(corpus, "val"), loaded.spec, "cpu", 300)
    write_result("pretrain_backbone", {"iters": args.iters, "train_seconds": seconds, "corpus_val": val,
                                       "file": str(args.out), "bytes": args.out.stat().st_size})  # fmt: skip


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
