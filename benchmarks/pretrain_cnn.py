"""Pre-train the tiny ResNet shipped as ``wsss/models/weights/resnet-tiny-synth.safetensors``.

CoBra's CNN branch starts from ImageNet weights in the paper; on the CPU demo this file stands in for them, as
``vit-tiny-synth`` does for the ViT. It is trained on a synthetic corpus as in ``pretrain_backbone.py`` (generator
seed 1, none of its classes a demo class; the shipped file used "broad", the default is now "broad2", written to
runs/ until it is chosen): ``cobra-tiny-synth`` with only the two classification losses, keeping the CNN trunk
(``cnn.net.*``, torchvision key names) in fp16, with corpus, seed, iterations and command in the metadata.

    python benchmarks/pretrain_cnn.py --iters 800     # broad2; about 10 min on 2 idle CPU cores
    python benchmarks/pretrain_cnn.py --corpus broad --out wsss/models/weights/resnet-tiny-synth.safetensors
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from common import write_result
from pretrain_backbone import CORPUS_SIZES, corpus_is_generated
from wsss.data.datasets import VOCDataset
from wsss.data.synth import SynthConfig, generate_synth
from wsss.models import load_checkpoint, save_checkpoint, spec_from_meta
from wsss.train.configs import get_config
from wsss.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(CORPUS_SIZES), default="broad2")
    parser.add_argument("--seed", type=int, default=1, help="Generator seed of the corpus.")
    parser.add_argument("--work", type=Path, default=None, help="Default: runs/pretrain_cnn_CORPUS.")
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="Default: WORK/resnet-tiny-synth.safetensors.")
    args = parser.parse_args()
    work = args.work or Path(f"runs/pretrain_cnn_{args.corpus}")
    out = args.out or work / "resnet-tiny-synth.safetensors"

    corpus = work / args.corpus
    synth = SynthConfig(n_train=args.images, n_val=300, seed=args.seed, corpus=args.corpus, **CORPUS_SIZES[args.corpus])
    if not corpus_is_generated(corpus, synth):
        generate_synth(corpus, synth)
    overrides = ["pretrained_cnn=null", "cobra.cap=false", "cobra.sap=false", "cobra.cam_loss=false",
                 f"train.iters={args.iters}", "optim.lr=5e-4", "train.ckpt_every=200"]  # fmt: skip
    cfg = get_config("cobra-tiny-synth", overrides)
    tic = time.perf_counter()
    ckpt = train(cfg, VOCDataset(corpus, "train"), work / "run", progress=True, resume=True)  # rerun continues
    seconds = time.perf_counter() - tic
    state, meta = load_checkpoint(ckpt)
    trunk = {k.removeprefix("cnn.net."): v.half() if v.is_floating_point() else v
             for k, v in state.items() if k.startswith("cnn.net.")}  # fmt: skip
    command = shlex.join(["python", *sys.argv])
    provenance = {"corpus": synth.__dict__, "iters": args.iters, "train_seconds": seconds, "command": command}
    arch = spec_from_meta(meta, ckpt).arch["cnn"]
    save_checkpoint(out, trunk, {"kind": "resnet_trunk", "model": arch, **provenance})
    params = sum(v.numel() for v in trunk.values())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {params} params)")
    name = "pretrain_cnn" if args.corpus == "broad" else f"pretrain_cnn_{args.corpus}"
    write_result(name, {**provenance, "file": str(out), "bytes": out.stat().st_size})


if __name__ == "__main__":
    main()
