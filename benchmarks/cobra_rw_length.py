"""CoBra masks against the random-walk length: mIoU of (4.22) masks, with and without the row-D CRF.

Uses the outputs of ``wsss cobra-masks`` (its IRN checkpoint) and the CoBra checkpoint it came from; for each
``exp_times`` (T squared that many times; 0 = no walk) the masks of the first ``--images`` images are scored.

    python benchmarks/cobra_rw_length.py --ckpt runs/cobra_synth/all-s0/last.safetensors \\
        --irn runs/cobra_masks_s0_irn/irn.safetensors --data demo_out/synth --split train300 --images 60
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import write_result
from wsss.cam.irn import cobra_mask, random_walk
from wsss.data.datasets import VOCDataset, check_classes
from wsss.data.transforms import normalize_images
from wsss.eval.metrics import ConfusionMatrix
from wsss.models import load_model
from wsss.train.cobra_masks import cobra_maps
from wsss.train.irn import load_irn


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--irn", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--exp-times", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--pad-size", type=int, default=128)
    args = parser.parse_args()
    loaded = load_model(args.ckpt)
    if loaded.spec.family != "cobra":
        parser.error(f"{args.ckpt}: a {loaded.spec.family} network, not CoBra")
    irn, cfg = load_irn(args.irn)
    data = VOCDataset(args.data, args.split)
    check_classes(data, loaded.spec.class_names)
    scores = {(e, crf): ConfusionMatrix(data.num_classes) for e in args.exp_times for crf in (True, False)}
    for i in range(min(args.images, len(data))):
        sample = data[i]
        maps = cobra_maps(loaded.model, sample.image, data.labels(i), loaded.spec.cam)
        edge = irn.infer_edge(normalize_images(sample.image), args.pad_size)
        source = maps.tran4  # M_tran^{/4}, the random walk's input (rw_source="tran", as write_masks)
        for e in args.exp_times:
            rw = random_walk(source, edge, cfg.beta, e, cfg.radius_infer) if e else source
            for crf in (True, False):
                mask = cobra_mask(rw, sample.image.shape[:2], maps.keys, image=sample.image if crf else None)
                scores[e, crf].update(torch.from_numpy(mask), torch.from_numpy(sample.mask))
    rows = [{"exp_times": e, "crf": crf, "miou": cm.compute()["miou"]} for (e, crf), cm in scores.items()]
    for row in rows:
        walk = f"T^{2 ** row['exp_times']}" if row["exp_times"] else "no walk"
        print(f"exp_times {row['exp_times']} ({walk}) crf {row['crf']!s:5s} mIoU {100 * row['miou']:.1f}")
    write_result("cobra_rw_length", {"images": args.images, "split": args.split, "ckpt": str(args.ckpt), "rows": rows})


if __name__ == "__main__":
    main()
