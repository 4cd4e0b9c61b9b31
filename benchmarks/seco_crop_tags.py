"""What SeCo's crop-and-tag (§3.4) feeds LIL/LIG: how many class-tagged crops lie on context, not object.

For each checkpoint, the training images (resized to the config's crop) go through the training code's own ROI and
tagging (``SeCoObjective.pseudo_labels``: multi-scale aux CAM, ``cam_to_label`` with the uncertain band,
``crop_and_tag``). Each crop tagged with a context class k (boat, train, cow) is then scored against the ground
truth: the shares of its window that are object k and that are k's context (``ContextMask``). A crop whose window
holds more context than object teaches LIL/LIG that context looks like k. "lent" crops hold no confident pixel of
k: their tag comes from the single-class rule that counts uncertain pixels as the image's class (§3.4 step 3).

    python benchmarks/seco_crop_tags.py --data demo_out/synth --name seco-s3 \\
        runs/seco_trajectory/seco-tiny-synth-s3/step00{060,120}
    python benchmarks/seco_crop_tags.py --data demo_out/synth --name seco-final-s0-4 \\
        runs/seco_vs_cam/seco-tiny-synth-s{0..4}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import write_result
from wsss.data.datasets import VOCDataset, check_classes
from wsss.data.palette import read_label_png
from wsss.data.transforms import to_tensor
from wsss.models import load_model
from wsss.train.configs import get_config
from wsss.train.loop import CHECKPOINT
from wsss.train.seco import SeCoObjective
from wsss.train.seco_crops import crop_windows


def load_set(data: Path, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, VOCDataset]:
    """Train images (N,3,s,s), labels (N,K), masks and context masks (N,s,s), all resized to ``size``, and the
    split itself."""
    ds = VOCDataset(data, "train")
    images, labels, masks, contexts = [], [], [], []
    for i in range(len(ds)):
        sample = ds[i]
        img = to_tensor(sample.image)[None]
        images.append(F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)[0])
        labels.append(torch.from_numpy(sample.labels))
        for maps, arr in ((masks, sample.mask), (contexts, read_label_png(data / "ContextMask" / f"{ds.ids[i]}.png"))):
            t = torch.from_numpy(arr.astype(np.int64))[None, None].float()
            maps.append(F.interpolate(t, size=(size, size), mode="nearest")[0, 0].long())
    return torch.stack(images), torch.stack(labels), torch.stack(masks), torch.stack(contexts), ds


@torch.no_grad()
def crop_stats(ckpt: Path, cfg: dict, data: tuple, batch: int = 16) -> dict:
    """Per context class: class-tagged crops, the share lying mostly on context, and the share of lent tags."""
    images, labels, masks, contexts, ds = data
    loaded = load_model(ckpt)
    check_classes(ds, loaded.spec.class_names, str(ckpt))
    model, names = loaded.model, loaded.spec.class_names
    objective = SeCoObjective(model, cfg).eval()
    s, k = cfg["seco"]["local_crop"], len(names) - 1
    size = images.shape[-1]
    counts = {int(c): torch.zeros(3) for c in contexts.unique() if 0 < c <= k}  # tagged, context-dominated, lent
    for step, start in enumerate(range(0, len(images), batch)):
        x, y = images[start : start + batch], labels[start : start + batch]
        box = torch.tensor([[0, size, 0, size]]).expand(len(x), 4)
        pseudo = objective.pseudo_labels(model, x, y, box, step, dense=False)
        pos, tags = pseudo["positions"], pseudo["flags"][:, 2:]  # local crops only
        obj, ctx = (crop_windows(m[start : start + batch, None], pos, s)[:, :, 0] for m in (masks, contexts))
        conf = crop_windows(pseudo["roi"][:, None], pos, s)[:, :, 0]  # confident pixels are 1..K
        tags_t = tags.t()  # (n, B), the windows' order
        for c in counts:
            hit = tags_t == c
            obj_share = (obj == c).flatten(2).float().mean(-1)
            ctx_share = (ctx == c).flatten(2).float().mean(-1)
            lent = ~(conf == c).flatten(2).any(-1)
            counts[c] += torch.stack([hit.sum(), (hit & (ctx_share > obj_share)).sum(), (hit & lent).sum()]).float()
    out = {}
    for c, (n, on_ctx, lent) in counts.items():
        out[names[c]] = {"tagged": int(n), "context_dominated": (on_ctx / n).item() if n else None,
                         "lent": (lent / n).item() if n else None}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", type=Path, nargs="+", help="checkpoints or stage folders holding one")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", default="seco-tiny-synth")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides, key=value")
    parser.add_argument("--name", required=True, help="results name: benchmarks/results/seco_crop_tags_NAME.json")
    args = parser.parse_args()
    cfg = get_config(args.config, args.overrides)
    data = load_set(args.data, cfg["data"]["crop"])
    rows = []
    for stage in args.stages:
        ckpt = stage / CHECKPOINT if stage.is_dir() else stage
        row = {"checkpoint": str(ckpt), "classes": crop_stats(ckpt, cfg, data)}
        rows.append(row)
        text = "  ".join(f"{c} {v['tagged']:4d} crops {100 * (v['context_dominated'] or 0):4.1f}% on context "
                         f"({100 * (v['lent'] or 0):4.1f}% lent)" for c, v in row["classes"].items())  # fmt: skip
        print(f"{stage}: {text}", flush=True)
    meta = {"config": args.config, "overrides": args.overrides, "data": str(args.data)}
    write_result(f"seco_crop_tags_{args.name}", {**meta, "stages": rows})


if __name__ == "__main__":
    main()
