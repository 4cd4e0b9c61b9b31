"""CoBra on the synthetic benchmark: seed mIoU per seed source, and a loss ablation, over several seeds.

For each seed and variant (all losses; no CAP; no SAP; no L_cam; ``gmp``: all losses with max- instead of
mean-pooled image logits) ``cobra-tiny-synth`` is trained (an interrupted run resumes, a finished one and its
evaluation are reused). Its multi-scale CAM stack is computed once per image; every seed source (cnn, vit, avg,
max, fuse) then gets the attention-percentile background searched on training images, as CoBra's eval_cam does
(§4.9), and is scored on the validation split with it.

    python benchmarks/cobra_synth.py --data demo_out/synth --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import RESULTS, method_chart, write_result
from wsss.cam.labels import cam_to_label
from wsss.cam.pipeline import base_size, forward_pyramid, image_pyramid, postprocess, stack_maps
from wsss.data.datasets import VOCDataset, check_classes
from wsss.data.palette import read_label_png
from wsss.eval.metrics import ConfusionMatrix, ContextFalseActivation
from wsss.models import LoadedModel, load_model
from wsss.models.spec import SEED_SOURCES
from wsss.train.configs import get_config
from wsss.train.loop import CHECKPOINT, train

VARIANTS = {"all": [], "no_cap": ["cobra.cap=false"], "no_sap": ["cobra.sap=false"],
            "no_cam_loss": ["cobra.cam_loss=false"],
            "gmp": ["model.pooling=gmp"]}  # all losses, max-pooled image logits: tests the GAP explanation  # fmt: skip
PERCENTILES = tuple(range(5, 96, 5))  # the optima of earlier runs (60-90) lie well inside
CACHE = "seed_eval.json"  # per run: {"cam": the CAM settings it was computed with, "sources": per-source scores}


@torch.no_grad()
def seed_scores(loaded: LoadedModel, data: VOCDataset, n: int, grid: list[tuple[str, float]],
                context: bool = False) -> dict[tuple[str, float], dict]:  # fmt: skip
    """Seed mIoU and per-class precision of the first ``n`` images for every (source, percentile) of ``grid``,
    and with ``context`` the context false activation.

    The CAM stack of a batch is computed once by the one CAM path (``wsss.cam.pipeline``); each grid point is
    then ``postprocess`` with the network's settings, ``source`` and ``bg_percentile`` replaced. As
    ``predict_cams`` does at a fixed input size, the normalised maps are resized to the image and labelled there
    with the image's background score.
    """
    spec = loaded.spec
    settings = spec.cam
    cms = {key: ConfusionMatrix(data.num_classes) for key in grid}
    fas = {key: ContextFalseActivation() for key in grid}
    for start in range(0, n, 16):
        samples = [data[i] for i in range(start, min(start + 16, n))]
        inputs = image_pyramid([s.image for s in samples], settings, "cpu", spec.mean, spec.std)
        size = base_size([s.image for s in samples], settings)
        stack = stack_maps(forward_pyramid(loaded.model, inputs, settings), size, settings)
        y = torch.stack([torch.from_numpy(s.labels).float() for s in samples])
        masks = [torch.from_numpy(s.mask) for s in samples]
        ctx = [torch.from_numpy(read_label_png(data.root / "ContextMask" / f"{s.id}.png")) for s in samples
               ] if context else []  # fmt: skip
        for source, percentile in grid:
            cams, bkg, _ = postprocess(stack, y, settings.replace(source=source, bg_percentile=float(percentile)))
            for i, mask in enumerate(masks):
                cam = F.interpolate(cams[i : i + 1], size=mask.shape, mode="bilinear", align_corners=False)
                _, seed = cam_to_label(cam, y[i : i + 1], bkg[i])
                cms[source, percentile].update(seed[0], mask)
                if context:
                    fas[source, percentile].update(seed[0], ctx[i])
    out = {}
    for key, cm in cms.items():
        res = cm.compute()
        out[key] = {"miou": res["miou"], "precision": res["precision"],
                    "context_fa": fas[key].compute()["overall"] if context else None}  # fmt: skip
    return out


def evaluate(loaded: LoadedModel, data: Path, n_search: int) -> dict:
    """Per source: the percentile searched on training images, and the validation scores with it."""
    train_set, val = VOCDataset(data, "train"), VOCDataset(data, "val")
    for split in (train_set, val):
        check_classes(split, loaded.spec.class_names)
    search = seed_scores(loaded, train_set, min(n_search, len(train_set)),
                         [(source, p) for source in SEED_SOURCES for p in PERCENTILES])  # fmt: skip
    best = {}
    for source in SEED_SOURCES:
        scores = {p: search[source, p]["miou"] for p in PERCENTILES}
        best[source] = (max(scores, key=scores.get), scores)
    held_out = seed_scores(loaded, val, len(val), [(source, p) for source, (p, _) in best.items()], context=True)
    result = {}
    for source, (p, scores) in best.items():
        held = held_out[source, p]
        result[source] = {"percentile": p, "train_miou": scores[p], "val_miou": held["miou"],
                          "val_context_fa": held["context_fa"], "val_precision": held["precision"],
                          "search_curve": scores}  # fmt: skip
    return result


def cached_evaluation(out: Path, data: Path, n_search: int) -> dict:
    """The run's per-source scores, recomputed when the cache is missing or was made with other CAM settings
    (files of earlier versions hold the scores alone; the CAM path has changed since)."""
    cached, loaded = out / CACHE, load_model(out / CHECKPOINT)
    record = json.loads(cached.read_text()) if cached.is_file() else {}
    if record.get("cam") != loaded.spec.cam.to_dict():
        record = {"cam": loaded.spec.cam.to_dict(), "sources": evaluate(loaded, data, n_search)}
        cached.write_text(json.dumps(record))
    return record["sources"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/cobra_synth"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--search-images", type=int, default=300, help="training images for the percentile search")
    parser.add_argument("--name", default="cobra_synth", help="results/NAME.json")
    parser.add_argument("--plot", type=Path, default=None, help="only redraw the PNG of this results JSON")
    args = parser.parse_args()
    if args.plot:
        return plot(json.loads(args.plot.read_text())["per_seed"], args.plot.with_suffix(".png"))
    rows: dict[str, dict[int, dict]] = {variant: {} for variant in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            out = args.work / f"{variant}-s{seed}"
            cfg = get_config("cobra-tiny-synth", VARIANTS[variant])
            train(cfg, VOCDataset(args.data, "train"), out, seed=seed, progress=False, resume=True)  # finishes a run
            rows[variant][seed] = cached_evaluation(out, args.data, args.search_images)
            print(variant, seed, {s: round(100 * r["val_miou"], 1) for s, r in rows[variant][seed].items()})
    summary = {v: {s: _stats([r[s]["val_miou"] for r in per_seed.values()]) for s in SEED_SOURCES}
               for v, per_seed in rows.items()}  # fmt: skip
    context = {v: {s: _stats([r[s]["val_context_fa"] for r in per_seed.values()]) for s in SEED_SOURCES}
               for v, per_seed in rows.items()}  # fmt: skip
    for title, table in (("val seed mIoU", summary), ("val context false activation", context)):
        print(f"\n{title}, mean +- std over seeds {args.seeds}")
        print(f"{'variant':12s}" + "".join(f"{s:>14s}" for s in SEED_SOURCES))
        for variant, per_source in table.items():
            cells = "".join(f"{100 * m['mean']:8.1f} +- {100 * m['std']:3.1f}" for m in per_source.values())
            print(f"{variant:12s}{cells}")
    plot(rows, RESULTS / f"{args.name}.png")
    write_result(args.name, {"seeds": args.seeds, "per_seed": rows, "summary": summary, "context_fa": context})


def plot(rows: dict, path: Path) -> None:
    """Each seed source of the first variant (all losses, by default) as a bar."""
    variant = next(iter(rows))
    runs = {source: {seed: {"miou": r[source]["val_miou"], "context_false_activation": r[source]["val_context_fa"]}
                     for seed, r in rows[variant].items()} for source in SEED_SOURCES}  # fmt: skip
    method_chart(path, f"cobra-tiny-synth ({variant}) by seed source", runs)


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "values": []}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


if __name__ == "__main__":
    main()
