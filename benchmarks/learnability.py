"""Can a trunk learn a set's classes from scratch? Tag classifiers on a VOC-layout set, per-class AP on its val split.

Issue 20's calibration, kept in the repository: before blaming a WSSS recipe for low seeds, check that the trunk
it trains can tell the classes apart at all in the same budget. Each trunk gets a bias-free 1x1 classifier on its
feature map, pooled by GMP (``--pool``), trained from scratch on the train split with multi-label soft-margin loss
(the CAM objective (1.2)), AdamW with a one-cycle schedule, flips and a +-16 px circular shift per batch, images
padded to ``--size`` (larger ones shrunk to fit). Every ``--every`` epochs it prints and records val per-class
average precision, their mean (mAP) and per-label accuracy (against the all-absent answer), then writes
``results/learnability_NAME.{json,png}``.

Trunks (``--trunks``):

* ``resnet-tiny``: the package's tiny ResNet (``layers [1,1,1,1]``, channels 32-256, CoBra/IRN strides, BatchNorm
  trainable), the ``cobra-tiny-synth`` CNN branch;
* ``vit-tiny``, ``vit-tiny-conv``: ``cam-tiny-synth``'s ViT (4 blocks, patch 8) with its patch stem or the
  stride-2 conv stem (``stem=conv``);
* ``vit-tiny-vgg``: the same ViT with the ``vgg`` reference's first three stages as its stem;
* ``vgg``: 3x3 convolutions at full resolution before every 2x pooling (widths 16-128, output stride 8, the ViT's
  token grid): ``wsss.models.vgg``, the trunk of ``cam-vgg-synth``.

``--init FILE`` starts the ``vgg`` trunk from pre-trained weights (through ``wsss.models.vgg.load_vgg_weights``)
instead of from scratch, to check that a pre-training transfers before any CAM run.

    python benchmarks/learnability.py --data data/probe --name probe             # all four trunks, 10 epochs
    python benchmarks/learnability.py --data data/probe --trunks vgg --epochs 25 --name probe-vgg25
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import RESULTS, write_result
from wsss.data.datasets import VOCDataset
from wsss.data.transforms import normalize_images
from wsss.models.backbone import BackboneConfig, create_vit, forward_tokens, token_grid, token_map
from wsss.models.resnet import ResNetConfig, create_resnet
from wsss.models.vgg import VGGConfig, VGGTrunk, load_vgg_weights
from wsss.train.configs import get_config

TRUNKS = ("resnet-tiny", "vit-tiny", "vit-tiny-conv", "vit-tiny-vgg", "vgg")


def load_split(root: Path, split: str, size: int, masks: bool = False):
    """(N, 3, size, size) normalised images (top-left on black, larger ones shrunk to fit), (N, K) tags, class names,
    and with ``masks`` the (N, size, size) int64 class masks fitted the same way (255 outside the image)."""
    ds = VOCDataset(root, split)
    images = torch.zeros((len(ds), 3, size, size))
    tags = np.zeros((len(ds), ds.num_fg), np.float32)
    targets = torch.full((len(ds), size, size), 255, dtype=torch.int64) if masks else None
    for i in range(len(ds)):
        sample = ds[i]
        img, mask = sample.image, sample.mask
        if max(img.shape[:2]) > size:
            r = size / max(img.shape[:2])
            shape = (min(size, round(img.shape[1] * r)), min(size, round(img.shape[0] * r)))
            img = cv2.resize(img, shape, interpolation=cv2.INTER_AREA)
            mask = None if mask is None else cv2.resize(mask, shape, interpolation=cv2.INTER_NEAREST)
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[: img.shape[0], : img.shape[1]] = img
        images[i] = normalize_images(canvas)
        tags[i] = sample.labels
        if masks:
            if mask is None:
                raise SystemExit(f"{root}: {sample.id} has no class mask (SegmentationClass/{sample.id}.png)")
            targets[i, : mask.shape[0], : mask.shape[1]] = torch.from_numpy(mask.astype(np.int64))
    out = (images, torch.from_numpy(tags), tuple(ds.classes[1:]))
    return (*out, targets) if masks else out


class ViTTrunk(nn.Module):
    """A ViT as a feature map; ``vgg_stem`` replaces its patch embedding by the reference's first three stages."""

    def __init__(self, cfg: BackboneConfig, vgg_stem: bool = False):
        super().__init__()
        self.vit, self.patch = create_vit(cfg), cfg.overrides["patch_size"]
        self.out_channels = self.vit.embed_dim
        if vgg_stem:
            stem = VGGTrunk(VGGConfig(stages=3))
            self.vit.patch_embed.proj = nn.Sequential(stem, nn.Conv2d(stem.out_channels, self.out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = forward_tokens(self.vit, x)
        return token_map(tokens, self.vit.num_prefix_tokens, token_grid(x, self.patch))


class ResNetTrunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = create_resnet(ResNetConfig(name="custom", fixed_bn=False, frozen_stages=0))
        self.out_channels = self.net.layer4[-1].conv2.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


def build_trunk(name: str) -> nn.Module:
    if name == "resnet-tiny":
        return ResNetTrunk()
    if name == "vgg":
        return VGGTrunk(VGGConfig())
    backbone = dict(get_config("cam-tiny-synth")["model"]["backbone"])
    stem = "conv" if name == "vit-tiny-conv" else "patch"
    return ViTTrunk(BackboneConfig(**{**backbone, "stem": stem}), vgg_stem=name == "vit-tiny-vgg")


class TagClassifier(nn.Module):
    def __init__(self, trunk: nn.Module, num_fg: int, pool: str):
        super().__init__()
        self.trunk, self.pool = trunk, pool
        self.classifier = nn.Conv2d(trunk.out_channels, num_fg, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        f = f.amax((2, 3), keepdim=True) if self.pool == "gmp" else f.mean((2, 3), keepdim=True)
        return self.classifier(f).flatten(1)


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """AP of one class: mean precision at each positive, ranked by score (ties broken by order)."""
    order = scores.argsort(descending=True)
    hits = positives[order].float()
    if hits.sum() == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, tags: torch.Tensor) -> dict:
    model.eval()
    logits = torch.cat([model(images[i : i + 100]) for i in range(0, len(images), 100)])
    model.train()
    ap = [average_precision(logits[:, k], tags[:, k] > 0) for k in range(tags.shape[1])]
    return {"ap": ap, "map": float(np.nanmean(ap)), "acc": float(((logits > 0).float() == tags).float().mean())}


def augment(x: torch.Tensor, gen: torch.Generator, mask: torch.Tensor | None = None):
    """Flips per image and one circular shift of up to 16 px per batch; with ``mask`` (N, H, W), the same for it and
    ``(x, mask)`` is returned."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-16, 17, (2,), generator=gen))
    x = torch.roll(x, (dy, dx), (2, 3))
    if mask is None:
        return x
    return x, torch.where(flip.view(-1, 1, 1), mask.flip(-1), mask).roll((dy, dx), (1, 2))


def optimizer_step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor) -> torch.Tensor:
    """One AdamW step and one schedule step; the detached loss (no host sync)."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()


def train_trunk(name: str, data: tuple, args: argparse.Namespace) -> dict:
    (x_tr, y_tr, names), (x_va, y_va, _) = data
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    trunk = build_trunk(name)
    if args.init is not None:
        if name != "vgg":
            raise SystemExit(f"--init starts the vgg trunk only, not {name}")
        print(load_vgg_weights(trunk, args.init).check(), flush=True)
    model = TagClassifier(trunk, y_tr.shape[1], args.pool)
    per_epoch = len(x_tr) // args.batch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * per_epoch)
    log, tic, step = [], time.perf_counter(), 0
    for epoch in range(1, args.epochs + 1):
        perm, total = torch.randperm(len(x_tr), generator=gen), torch.zeros(())
        for i in range(per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            loss = F.multilabel_soft_margin_loss(model(augment(x_tr[idx], gen)), y_tr[idx])
            total += optimizer_step(opt, sched, loss)
            step += 1
        if epoch % args.every == 0 or epoch == args.epochs:
            row = {"epoch": epoch, "step": step, "loss": float(total) / per_epoch, "seconds": time.perf_counter() - tic,
                   **evaluate(model, x_va, y_va)}  # fmt: skip
            log.append(row)
            aps = " ".join(f"{n} {v:.2f}" for n, v in zip(names, row["ap"], strict=True))
            print(f"{name:14s} epoch {epoch:3d} step {step:5d} loss {row['loss']:.3f} mAP {row['map']:.3f} "
                  f"acc {row['acc']:.3f} ({row['seconds']:.0f} s) | {aps}", flush=True)  # fmt: skip
    params = sum(p.numel() for p in model.trunk.parameters())
    return {"trunk": name, "params": params, "log": log}


def draw(path: Path, runs: list[dict], chance: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        ax.plot([r["step"] for r in run["log"]], [r["map"] for r in run["log"]], marker="o", label=run["trunk"])
    ax.axhline(chance, color="grey", ls="--", label="chance (positive rate)")
    ax.set(xlabel="training step (batch 32)", ylabel="val mAP", ylim=(0, 1), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="VOC-layout root with train and val splits.")
    parser.add_argument("--trunks", nargs="+", choices=TRUNKS, default=list(TRUNKS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--every", type=int, default=2, help="Evaluate every N epochs.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--pool", choices=("gmp", "gap"), default="gmp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--init", type=Path, default=None, help="Pre-trained weights of the vgg trunk.")
    parser.add_argument("--name", default="probe", help="Results go to OUT/learnability_NAME.{json,png}.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Default: benchmarks/results.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_split(args.data, "train", args.size), load_split(args.data, "val", args.size)
    chance = float(data[1][1].mean())  # the AP of a random ranking
    runs = []
    for name in args.trunks:
        runs.append(train_trunk(name, data, args))
        payload = {"data": str(args.data), "settings": {k: v for k, v in vars(args).items() if k != "data"},
                   "classes": list(data[0][2]), "val_positive_rate": chance, "runs": runs}  # fmt: skip
        payload["settings"].update(trunks=list(args.trunks), out=str(args.out), init=args.init and str(args.init))
        write_result(f"learnability_{args.name}", payload, args.out / f"learnability_{args.name}.json")
    draw(args.out / f"learnability_{args.name}.png", runs, chance, f"From-scratch tag classifiers on {args.data.name}")


if __name__ == "__main__":
    main()
