"""Pre-train the tiny ResNet shipped as ``wsss/models/weights/resnet-tiny-synth.safetensors``.

CoBra's CNN branch starts from ImageNet weights in the paper; on the CPU demo this file stands in for them, as
``vit-tiny-synth`` does for the ViT. It is trained on the same "broad" synthetic corpus (generator seed 1, 24
random shape x texture x colour classes, none of them a demo class): ``cobra-tiny-synth`` with only the two
classification losses, keeping the CNN trunk (``cnn.net.*``, torchvision key names) in fp16.

    python benchmarks/pretrain_cnn.py --iters 800     # about 10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import write_result
from wsss.data.datasets import VOCDataset
from wsss.data.synth import SynthConfig, generate_synth
from wsss.models import load_checkpoint, save_checkpoint, spec_from_meta
from wsss.models.loading import BUILTIN_WEIGHTS
from wsss.train.configs import get_config
from wsss.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/pretrain_cnn"))
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=BUILTIN_WEIGHTS / "resnet-tiny-synth.safetensors")
    args = parser.parse_args()

    corpus = args.work / "broad"
    synth = SynthConfig(n_train=args.images, n_val=300, seed=1, corpus="broad")
    if not (corpus / "classes.txt").is_file():
        generate_synth(corpus, synth)
    overrides = ["pretrained_cnn=null", "cobra.cap=false", "cobra.sap=false", "cobra.cam_loss=false",
                 f"train.iters={args.iters}", "optim.lr=5e-4", "train.ckpt_every=200"]  # fmt: skip
    cfg = get_config("cobra-tiny-synth", overrides)
    tic = time.perf_counter()
    ckpt = train(cfg, VOCDataset(corpus, "train"), args.work / "run", progress=True, resume=True)  # rerun continues
    seconds = time.perf_counter() - tic
    state, meta = load_checkpoint(ckpt)
    trunk = {k.removeprefix("cnn.net."): v.half() if v.is_floating_point() else v
             for k, v in state.items() if k.startswith("cnn.net.")}  # fmt: skip
    provenance = {"corpus": synth.__dict__, "iters": args.iters, "train_seconds": seconds}
    arch = spec_from_meta(meta, ckpt).arch["cnn"]
    save_checkpoint(args.out, trunk, {"kind": "resnet_trunk", "model": arch, **provenance})
    params = sum(v.numel() for v in trunk.values())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {params} params)")
    write_result("pretrain_cnn", {"iters": args.iters, "train_seconds": seconds, "file": str(args.out),
                                  "bytes": args.out.stat().st_size})  # fmt: skip


if __name__ == "__main__":
    main()
