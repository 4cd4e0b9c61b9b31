"""Pre-train the tiny VGG trunk shipped as ``wsss/models/weights/vgg-tiny-synth.safetensors`` (``cam-vgg-synth``).

The CPU stand-in for ImageNet weights of the plain CAM on a CNN (issue 20, docs/transfer.md). The corpus is ours,
so its masks are known: the trunk learns per-pixel segmentation of the broad2 corpus (generator seed 1; shape,
texture and shape+texture classes in random colours per instance, five background models; none of the probe set's
classes), a 1x1 class head plus a 1x1 class-agnostic objectness head (figure against ground, the part that is
meant to transfer to classes the corpus does not hold), both upsampled to the input and trained by cross-entropy.
Only the trunk is kept, in fp16, with its provenance (corpus, seed, steps, command) in the metadata.

    python benchmarks/pretrain_vgg.py --out wsss/models/weights/vgg-tiny-synth.safetensors   # ~40 min, 2 idle cores
    python benchmarks/pretrain_vgg.py --resume                 # continue after an interruption
    python benchmarks/pretrain_vgg.py --init wsss/models/weights/vgg-tiny-synth.safetensors --images 12000 \\
        --iters 2000 --lr 1e-3 --work runs/pretrain_vgg2 --json benchmarks/results/pretrain_vgg_stage2.json
        # a second stage from the shipped trunk (fresh heads); --json keeps results/pretrain_vgg.json the shipped run's

Every ``--every`` steps it prints the corpus's val mIoU (35 classes) and objectness IoU, and saves the trunk and
the training state (``WORK/state.pt``: tensors only, read back with ``weights_only=True``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import add_json_option, write_result
from learnability import augment, load_split, optimizer_step
from pretrain_backbone import corpus_is_generated
from wsss.data.synth import SynthConfig, generate_synth
from wsss.models import save_checkpoint
from wsss.models.vgg import VGGConfig, VGGTrunk, load_vgg_weights


class DenseHeads(nn.Module):
    """Class and objectness logits of a trunk, bilinearly upsampled to the input (the pre-training network)."""

    def __init__(self, trunk: VGGTrunk, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.classes = nn.Conv2d(trunk.out_channels, num_classes, 1)
        self.objectness = nn.Conv2d(trunk.out_channels, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.trunk(x)
        up = [F.interpolate(h(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
              for h in (self.classes, self.objectness)]  # fmt: skip
        return up[0], up[1]


def dense_loss(model: DenseHeads, x: torch.Tensor, mask: torch.Tensor, objectness_weight: float) -> torch.Tensor:
    classes, objectness = model(x)
    figure = torch.where(mask == 255, mask, (mask > 0).long())
    return F.cross_entropy(classes, mask, ignore_index=255) + objectness_weight * F.cross_entropy(
        objectness, figure, ignore_index=255
    )


@torch.no_grad()
def evaluate(model: DenseHeads, x: torch.Tensor, mask: torch.Tensor) -> dict:
    """Val mIoU over the corpus's classes present and the IoU of the objectness head's figure."""
    model.eval()
    preds = [model(x[i : i + 100]) for i in range(0, len(x), 100)]
    model.train()
    classes = torch.cat([p[0].argmax(1) for p in preds])
    figure = torch.cat([p[1].argmax(1) for p in preds]).bool()
    valid = mask != 255
    n = int(mask[valid].max()) + 1
    hist = torch.bincount(mask[valid] * n + classes[valid].clamp(max=n - 1), minlength=n * n).view(n, n).double()
    union = hist.sum(0) + hist.sum(1) - hist.diag()
    iou = hist.diag()[union > 0] / union[union > 0]
    truth = (mask > 0) & valid
    fig_iou = float((figure & truth).sum() / ((figure | truth) & valid).sum().clamp(min=1))
    return {"miou": float(iou.mean()), "fg_miou": float(iou[1:].mean()), "objectness_iou": fig_iou}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="Generator seed of the broad2 corpus.")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--iters", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="Peak of the one-cycle AdamW schedule.")
    parser.add_argument("--objectness-weight", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=16, help="VGG width (cam-vgg-synth: 16).")
    parser.add_argument("--init", type=Path, default=None,
                        help="Start the trunk from this file (an earlier stage); the heads start fresh.")  # fmt: skip
    parser.add_argument("--every", type=int, default=250, help="Evaluate and save every N steps.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--work", type=Path, default=Path("runs/pretrain_vgg"))
    parser.add_argument("--out", type=Path, default=None, help="Default: WORK/vgg-tiny-synth.safetensors.")
    parser.add_argument("--resume", action="store_true", help="Continue from WORK/state.pt.")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="Stop (and save) at this step, the schedule still that of --iters.")  # fmt: skip
    add_json_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or args.work / "vgg-tiny-synth.safetensors"

    corpus = args.work / "broad2"  # at the probe set's image sizes
    synth = SynthConfig(n_train=args.images, n_val=args.val_images, seed=args.seed, corpus="broad2", min_size=80,
                        max_size=112, max_objects=args.max_objects)  # fmt: skip
    if not corpus_is_generated(corpus, synth):
        generate_synth(corpus, synth)
    x_tr, _, names, m_tr = load_split(corpus, "train", 112, masks=True)
    x_va, _, _, m_va = load_split(corpus, "val", 112, masks=True)

    torch.manual_seed(0)
    cfg = VGGConfig(width=args.width)
    model = DenseHeads(VGGTrunk(cfg), len(names) + 1)
    if args.init is not None:
        print(load_vgg_weights(model.trunk, args.init).check(), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.iters)
    gen = torch.Generator().manual_seed(0)
    state_path, step, log, seconds = args.work / "state.pt", 0, [], 0.0
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        if int(state["iters"]) != args.iters:
            raise SystemExit(f"{state_path}: a run of --iters {int(state['iters'])}; resume it with the same --iters")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, log, seconds = int(state["step"]), state["log"], float(state["seconds"])
        print(f"resumed {state_path} at step {step}", flush=True)
    command = shlex.join(["python", "benchmarks/pretrain_vgg.py", *(sys.argv[1:] if argv is None else argv)])
    tic, total, logged = time.perf_counter() - seconds, torch.zeros(()), step
    while step < min(args.iters, args.max_steps or args.iters):
        idx = torch.randint(0, len(x_tr), (args.batch,), generator=gen)
        loss = dense_loss(model, *augment(x_tr[idx], gen, m_tr[idx]), args.objectness_weight)
        total += optimizer_step(opt, sched, loss)
        step += 1
        if step % args.every == 0 or step in (args.iters, args.max_steps):
            row = {"step": step, "loss": float(total) / (step - logged), "seconds": time.perf_counter() - tic,
                   **evaluate(model, x_va, m_va)}  # fmt: skip
            total, logged = torch.zeros(()), step
            log.append(row)
            print(f"step {step:5d} loss {row['loss']:.3f} val mIoU {100 * row['miou']:.1f} (classes "
                  f"{100 * row['fg_miou']:.1f}) objectness IoU {100 * row['objectness_iou']:.1f} "
                  f"({row['seconds']:.0f} s)", flush=True)  # fmt: skip
            provenance = {"corpus": synth.__dict__, "steps": step, "iters": args.iters, "lr": args.lr,
                          "objectness_weight": args.objectness_weight, "train_seconds": row["seconds"],
                          "init": None if args.init is None else str(args.init), "command": command}  # fmt: skip
            trunk = {k: v.half() if v.is_floating_point() else v for k, v in model.trunk.state_dict().items()}
            save_checkpoint(out, trunk, {"kind": "vgg_trunk", "model": cfg.to_dict(), **provenance})
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "step": step, "iters": args.iters, "log": log,
                        "seconds": row["seconds"]},
                       state_path)  # fmt: skip
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    write_result("pretrain_vgg", {**provenance, "log": log, "file": str(out), "bytes": out.stat().st_size}, args.json)


if __name__ == "__main__":
    main()
