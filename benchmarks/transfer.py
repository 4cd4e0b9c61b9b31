"""Do the tiny recipes transfer? Val seed mIoU of tiny configs on a generated set, demo (synth) or probe.

For every config and training seed the config is trained on the set's train split (timed), and one pass of the
batch labeler with the network's own CAM settings (CoBra: the fused CAM) makes its val seeds and its default
labels, the seeds refined by the label CRF (§5.3 row C, ``wsss label --refine crf``); both are scored: mIoU,
per-class IoU and context false activation. The JSON is rewritten after every run; ``--resume`` keeps the finished
(config, seed) pairs of that file and runs the rest. ``--set`` overrides apply to every run and need a ``--name``
(the result file and run folders carry it), as do ``--gen`` settings of the generator's config (``ProbeConfig``,
``SynthConfig``). The set is generated once per (generator, sizes, data seed, settings).

    python benchmarks/transfer.py --generator probe                                   # cam-tiny-synth, seeds 0 1 2
    python benchmarks/transfer.py --generator synth --configs cam-tiny-synth seco-tiny-synth cobra-tiny-synth
    python benchmarks/transfer.py --generator probe --seeds 0 --set pretrained=null --name scratch
    python benchmarks/transfer.py --generator probe --configs cam-vgg-synth --gen p_context=0 --gen p_context_alone=0 \\
        --gen p_pair=0 --name no-cooccurrence                          # the same set without its co-occurrences
    python benchmarks/transfer.py --generator probe --strip ../docs/images/probe_samples.png   # sample images only
    python benchmarks/transfer.py --generator probe --cams RUN0/last.safetensors RUN1/last.safetensors --name re
                        # trained checkpoints scored with their config's CAM settings as they are now, no training
    python benchmarks/transfer.py --generator probe --cams RUN/last.safetensors --classes bolt nut arrow heart \\
        --strip ../docs/images/probe_cams_vgg.png                                  # a network's CAMs per class

``--sweep`` also scores each run's seeds over a range of background thresholds (threshold rule only), and its
seeds refined by the label CRF (§5.3, the form of row C) over a grid of kernel settings, on the first 400 train
images and on val: the setting the field would pick on train, and what it gives on val. With ``--cams CKPT`` it
sweeps that checkpoint instead of training (``--name`` names the result).

    python benchmarks/transfer.py --generator probe --cams RUN/last.safetensors --sweep --name crf-sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from baseline_options import THRESHOLDS, cam_pass, seed_miou_curve
from common import RESULTS, method_chart, val_seed_scores, write_result
from wsss.cam.crf import CRF_PRESETS, CRFParams, crf_from_labels
from wsss.cam.pipeline import predict_cams
from wsss.data.datasets import VOCDataset
from wsss.data.palette import read_label_png, voc_palette
from wsss.data.probe import ProbeConfig, generate_probe
from wsss.data.synth import SynthConfig, generate_synth
from wsss.eval.metrics import ConfusionMatrix
from wsss.models import CAMSettings, load_model
from wsss.train.configs import get_config, model_spec
from wsss.train.loop import train

# Label-CRF kernels swept by --sweep: row C's Gaussian term with bilateral ranges from a tenth of a small image to
# row C's 50 px, colour ranges from row C's 5 to a loose 30, and two weights; row C itself is one of them.
CRF_GRID = [dataclasses.replace(CRF_PRESETS["seed"], bi_sxy=sxy, bi_srgb=srgb, bi_compat=compat)
            for sxy in (10, 25, 50) for srgb in (5, 13, 30) for compat in (4, 10)]  # fmt: skip
# CAM settings --sweep also tries, each with its threshold picked on train: the CAM alone or fused with LayerCAM
# maps of a VGG trunk's stages 1 and 2 (CAMNet.layer_cams), on the config's scales or on scale 1.0 alone.
CAM_VARIANTS = {
    "config": {},
    "CAM": {"layers": ()},
    "CAM, scale 1.0": {"scales": (1.0,), "layers": ()},
    "LayerCAM 1,2": {"layers": (1, 2)},
    "LayerCAM 1,2, scale 1.0": {"scales": (1.0,), "layers": (1, 2)},
}
GENERATORS = {"synth": (SynthConfig, generate_synth), "probe": (ProbeConfig, generate_probe)}


def generator_settings(generator: str, items: list[str]) -> dict:
    """``KEY=VALUE`` settings of the generator's config class; a value is read as JSON, else kept as a string."""
    fields = {f.name for f in dataclasses.fields(GENERATORS[generator][0])}
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--gen {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def dataset(generator: str, n_train: int, n_val: int, seed: int, work: Path, settings: dict | None = None) -> Path:
    """The generated set (made on first use; the stats file is written last, so it marks a finished set).

    ``settings`` (more config fields) give the folder a suffix of their own, so a variant never reuses the default."""
    config_cls, generate = GENERATORS[generator]
    suffix = re.sub(r"[^\w=.,-]", "", "".join(f"-{k}={v}" for k, v in sorted((settings or {}).items())))
    root = work / f"{generator}-{n_train}-{n_val}-d{seed}{suffix}"
    if not (root / f"{generator}_stats.json").is_file():
        generate(root, config_cls(n_train=n_train, n_val=n_val, seed=seed, **(settings or {})), progress=False)
    return root


def run(config: str, seed: int, data: Path, out: Path, overrides: list[str], sweep: bool = False) -> dict:
    """Train from scratch in ``out`` (a leftover folder is removed: the time must be the whole run's) and score."""
    shutil.rmtree(out, ignore_errors=True)
    tic = time.perf_counter()
    ckpt = train(get_config(config, overrides), VOCDataset(data, "train"), out, seed=seed, progress=False)
    train_s = time.perf_counter() - tic
    return {**score(ckpt, data, out / "val"), "train_s": round(train_s, 1), **(sweeps(ckpt, data) if sweep else {})}


def score(ckpt: Path, data: Path, out: Path, cam: CAMSettings | None = None) -> dict:
    """Val seeds and the labeler's default labels (seeds refined by the label CRF, §5.3 row C) of ``ckpt`` from
    one labeler pass into ``out`` (``cam``: CAM settings other than the checkpoint's): mIoU, IoU by class name,
    precision, context false activation, and where the seeds' false positives lie."""
    scores = val_seed_scores(ckpt, data, out, refine="crf", cam=cam)
    names = scores.pop("class_names")
    for part in (scores, scores["labels"]):
        part["iou"] = dict(zip(names, part["iou"], strict=True))
    return {**scores, "false_positives": false_positive_places(out / "seeds", data)}


def rescore(ckpts: list[Path], data: Path, work: Path, overrides: list[str]) -> dict[str, dict[str, dict]]:
    """Checkpoints trained before, scored as ``run`` scores a fresh one but with their config's CAM settings as
    they are now (``overrides`` applied): runs keyed by the config and training seed in each file's metadata.
    Training does not read the CAM settings, so a row is the one a fresh run of the config gives, less its time."""
    runs: dict[str, dict[str, dict]] = {}
    for ckpt in ckpts:
        loaded = load_model(ckpt)
        config, seed = loaded.meta.get("config_name"), loaded.meta.get("seed")
        if config is None or seed is None:
            raise SystemExit(f"{ckpt}: no config name or training seed in its metadata (a wsss training checkpoint?)")
        cam = model_spec(get_config(config, overrides), loaded.spec.class_names).cam
        out = work / data.name / f"rescore-{config}-s{seed}"
        shutil.rmtree(out, ignore_errors=True)
        runs.setdefault(config, {})[str(seed)] = result = {**score(ckpt, data, out, cam), "checkpoint": str(ckpt)}
        print(f"{ckpt}: {config} seed {seed}, " + run_line(result))
    return runs


def sweeps(ckpt: Path, data: Path) -> dict:
    return {"sweep": threshold_sweep(ckpt, data), "crf": crf_sweep(ckpt, data)}


def threshold_sweep(ckpt: Path, data: Path, train_images: int = 400, variants: dict = CAM_VARIANTS) -> dict | None:
    """Seed mIoU at each of THRESHOLDS on the first ``train_images`` train images and on val, with the network's
    CAM settings and with each of ``variants`` (changes to them; the LayerCAM ones on VGG trunks only). ``picked``
    is the best threshold on train with the network's settings (the field's convention for seed tuning), ``best``
    the best (variant, threshold) on train. None for the attention rule (CoBra)."""
    loaded = load_model(ckpt)
    cam = loaded.spec.cam
    if cam.background != "threshold":
        return None
    vgg = loaded.spec.arch.get("backbone", {}).get("kind") == "vgg"
    rows = {name: _curves(loaded, data, train_images, cam.replace(**change))
            for name, change in variants.items() if vgg or not change.get("layers")}  # fmt: skip
    best = max(rows, key=lambda name: max(rows[name]["train"]))
    picked = {"variant": best, "threshold": rows[best]["picked"], "val": rows[best]["val_at_picked"]}
    return {"thresholds": THRESHOLDS, **rows["config"], "variants": rows, "best": picked}


def _curves(loaded, data: Path, train_images: int, settings) -> dict:
    """Seed mIoU curves over THRESHOLDS on train and val with ``settings``, and the threshold train picks."""
    train_curve = seed_miou_curve(loaded, VOCDataset(data, "train"), train_images, settings)
    val_curve = seed_miou_curve(loaded, VOCDataset(data, "val"), 10**9, settings)
    best = int(np.argmax(train_curve))
    return {"scales": list(settings.scales), "layers": list(settings.layers), "train": train_curve, "val": val_curve,
            "picked": THRESHOLDS[best], "val_at_picked": val_curve[best]}  # fmt: skip


def crf_sweep(ckpt: Path, data: Path, train_images: int = 400, grid: list[CRFParams] = CRF_GRID) -> dict:
    """Seed mIoU unrefined and after the label CRF at each setting of ``grid`` (which holds row C), on the first
    ``train_images`` train images and on val (one CAM pass per split); ``picked`` is the best setting on train."""
    loaded = load_model(ckpt)
    train_curve = crf_curve(loaded, VOCDataset(data, "train"), train_images, grid)
    val_curve = crf_curve(loaded, VOCDataset(data, "val"), 10**9, grid)
    best = int(np.argmax(train_curve[1:]))
    settings, row_c = [dataclasses.asdict(p) for p in grid], grid.index(CRF_PRESETS["seed"])
    return {"settings": settings, "train_unrefined": train_curve[0], "val_unrefined": val_curve[0],
            "train": train_curve[1:], "val": val_curve[1:], "picked": settings[best],
            "val_at_picked": val_curve[1 + best], "val_row_c": val_curve[1 + row_c]}  # fmt: skip


def crf_curve(loaded, data: VOCDataset, limit: int, grid: list[CRFParams]) -> list[float]:
    """[unrefined seed mIoU, then one per setting of ``grid``] over the first ``limit`` images of ``data``."""
    matrices = [ConfusionMatrix(data.num_classes) for _ in range(len(grid) + 1)]
    for s, r in cam_pass(loaded, data, limit):
        keys = np.concatenate([[0], np.flatnonzero(r.tags.numpy()) + 1]).astype(np.int64)
        truth = torch.from_numpy(s.mask)
        matrices[0].update(torch.from_numpy(r.seed), truth)
        for params, cm in zip(grid, matrices[1:], strict=True):
            cm.update(torch.from_numpy(crf_from_labels(s.image, r.seed, keys, params)), truth)
    return [cm.compute()["miou"] for cm in matrices]


def false_positive_places(seeds: Path, data: Path, near_px: int = 8, split: str = "val") -> dict[str, dict]:
    """Per foreground class, over the images that hold it: recall, and where its false positives lie.

    ``hull``: inside the convex hull of one of its instances (a nut's hole, a crescent's inside), ``near``: within
    ``near_px`` of such a hull, ``far``: anywhere else (its context, other objects, the background). Fractions of
    that class's false-positive pixels; ``fp_per_tp`` compares the two counts. Ignore pixels are left out."""
    val = VOCDataset(data, split)
    counts = {name: np.zeros(5, np.int64) for name in val.classes[1:]}  # tp, fn, fp in hull, near, far
    ring = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * near_px + 1, 2 * near_px + 1))
    for image_id in val.ids:
        truth = read_label_png(data / "SegmentationClass" / f"{image_id}.png")
        pred = read_label_png(seeds / f"{image_id}.png")
        valid = truth != 255
        for k in np.unique(truth[valid]):
            if k == 0:
                continue
            obj = (truth == k).astype(np.uint8)
            hull = np.zeros_like(obj)
            n, parts = cv2.connectedComponents(obj)
            for c in range(1, n):
                cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero((parts == c).astype(np.uint8))), 1)
            near = cv2.dilate(hull, ring).astype(bool)
            hit, obj, hull = (pred == k) & valid, obj.astype(bool), hull.astype(bool)
            fp = hit & ~obj
            counts[val.classes[k]] += [(hit & obj).sum(), (obj & ~hit).sum(), (fp & hull).sum(),
                                       (fp & near & ~hull).sum(), (fp & ~near).sum()]  # fmt: skip
    out = {}
    for name, (tp, fn, *places) in counts.items():
        fp = sum(places)
        shares = {where: float(v / max(fp, 1)) for where, v in zip(("hull", "near", "far"), places, strict=True)}
        out[name] = {"recall": float(tp / max(tp + fn, 1)), "fp_per_tp": float(fp / max(tp, 1)), **shares}
    return out


def summarize(runs: dict[str, dict[str, dict]]) -> dict:
    """Per config: the seeds, mean and spread of val seed mIoU (and of the labels' mIoU where every run has
    them), mean training seconds and mean per-class IoU."""
    out = {}
    for config, per_seed in runs.items():
        rows = list(per_seed.values())
        miou = [r["miou"] for r in rows]
        out[config] = {
            "seeds": sorted(int(s) for s in per_seed),
            "miou_mean": float(np.mean(miou)),
            "miou_std": float(np.std(miou)),
            "train_s_mean": float(np.mean([r["train_s"] for r in rows if "train_s" in r] or [np.nan])),
            "iou_mean": {c: _mean_of_present([r["iou"][c] for r in rows]) for c in rows[0]["iou"]},
        }
        if all("labels" in r for r in rows):
            labels = [r["labels"]["miou"] for r in rows]
            out[config].update(labels_miou_mean=float(np.mean(labels)), labels_miou_std=float(np.std(labels)))
    return out


def _mean_of_present(values: list[float]) -> float:
    """The mean over the runs where the class was present (its IoU not NaN), NaN where it never was."""
    present = [v for v in values if not np.isnan(v)]
    return float(np.mean(present)) if present else float("nan")


def run_line(result: dict) -> str:
    """One run's val seed and label mIoU and its seeds' IoU per class, in %."""
    iou = ", ".join(f"{c} {100 * v:.1f}" for c, v in result["iou"].items())
    return f"val seed mIoU {100 * result['miou']:.1f}, labels {100 * result['labels']['miou']:.1f} ({iou})"


def report(runs: dict[str, dict[str, dict]]) -> None:
    """A line per config: mean and spread over training seeds of the seeds' (and labels') mIoU, and the time."""
    for config, row in summarize(runs).items():
        labels = (f", labels {100 * row['labels_miou_mean']:5.1f} +- {100 * row['labels_miou_std']:.1f}"
                  if "labels_miou_mean" in row else "")  # fmt: skip
        timed = "not timed (rescored)" if np.isnan(row["train_s_mean"]) else f"train {row['train_s_mean']:.0f} s"
        print(f"{config:18s} val seed mIoU {100 * row['miou_mean']:5.1f} +- {100 * row['miou_std']:.1f}{labels} "
              f"(seeds {row['seeds']}), {timed}")  # fmt: skip


def chart(path: Path, title: str, runs: dict[str, dict[str, dict]]) -> Path:
    """``method_chart`` of val seed mIoU, the labels' mIoU (where every run has them) and context false activation."""
    metrics = {"miou": "val seed mIoU (%)", "labels_miou": "val label mIoU, seeds + CRF (%)",
               "context_false_activation": "context false activation (%)"}  # fmt: skip
    flat = {config: {seed: {**r, "labels_miou": r.get("labels", {}).get("miou")} for seed, r in per_seed.items()}
            for config, per_seed in runs.items()}  # fmt: skip
    if any(r["labels_miou"] is None for per_seed in flat.values() for r in per_seed.values()):
        metrics.pop("labels_miou")
    return method_chart(path, title, flat, metrics)


def sample_strip(root: Path, path: Path, n: int = 8, split: str = "val") -> Path:
    """A PNG of the first ``n`` images of ``split``: image, class mask, context mask (VOC colours) at 112 px."""
    ids = VOCDataset(root, split).ids[:n]
    palette, columns = voc_palette(), []
    for image_id in ids:
        image = cv2.imread(str(root / "JPEGImages" / f"{image_id}.jpg"))[..., ::-1]
        label = palette[read_label_png(root / "SegmentationClass" / f"{image_id}.png")]
        context = palette[read_label_png(root / "ContextMask" / f"{image_id}.png")]
        cells = [cv2.resize(x, (112, 112), interpolation=cv2.INTER_NEAREST) for x in (image, label, context)]
        columns.append(np.concatenate(cells, 0))
    strip = np.concatenate(columns, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(strip[..., ::-1]))
    print(f"wrote {path}")
    return path


def cam_strip(ckpt: Path, root: Path, path: Path, classes: list[str], n: int = 4, split: str = "val") -> Path:
    """A PNG with a band per class: ``n`` images of ``split`` that hold it (top), its mask in red with the context
    regions in green (middle), and the network's normalised CAM of that class (bottom, jet), each at 112 px."""
    loaded = load_model(ckpt)
    spec, ds = loaded.spec, VOCDataset(root, split)
    names, bands = list(spec.class_names), []
    unknown = [name for name in classes if name not in names[1:]]
    if unknown:
        raise SystemExit(f"{ckpt}: no class {unknown[0]!r} in its network (classes: {', '.join(names[1:])})")
    for name in classes:
        c = names.index(name)  # background is 0, so CAM channel c - 1
        picks = [i for i in range(len(ds)) if ds.labels(i)[c - 1] > 0][:n]
        if not picks:
            print(f"{root}: no {split} image holds {name}; no band for it")
            continue
        samples = [ds[i] for i in picks]
        results = predict_cams(loaded.model, [s.image for s in samples], [s.labels for s in samples], spec.cam,
                               mean=spec.mean, std=spec.std)  # fmt: skip
        cells = []
        for sample, result in zip(samples, results, strict=True):
            context = read_label_png(root / "ContextMask" / f"{sample.id}.png") > 0
            masks = np.stack([sample.mask == c, context & (sample.mask == 0), np.zeros_like(context)], -1)
            heat = cv2.applyColorMap((255 * result.cam[c - 1].numpy()).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
            cells.append(np.concatenate([cv2.resize(x, (112, 112), interpolation=cv2.INTER_NEAREST)
                                         for x in (sample.image, 255 * masks.astype(np.uint8), heat)]))  # fmt: skip
        bands.append(np.concatenate(cells, 1))
    if not bands:
        raise SystemExit(f"{root}: no {split} image holds any of {classes}")
    width = max(b.shape[1] for b in bands)  # a class held by fewer than n images gets a shorter band
    bands = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0))) for b in bands]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(np.concatenate(bands)[..., ::-1]))
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", choices=list(GENERATORS), default="probe")
    parser.add_argument("--configs", nargs="+", default=["cam-tiny-synth"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--train", type=int, default=1000, help="training images (the demo's 1000)")
    parser.add_argument("--val", type=int, default=300, help="validation images (the demo's 300)")
    parser.add_argument("--data-seed", type=int, default=0, help="generator seed")
    parser.add_argument("--work", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--gen", dest="gen_settings", action="append", default=[], metavar="KEY=VALUE",
                        help="generator setting for the set, e.g. p_context=0 (JSON values; needs --name)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, every run")
    parser.add_argument("--name", default="", help="variant name (required with --set)")
    parser.add_argument("--resume", action="store_true", help="keep the finished (config, seed) pairs of the JSON")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--strip", type=Path, default=None, help="only write a PNG of 8 val images and masks here")
    parser.add_argument("--cams", type=Path, nargs="+", default=None,
                        help="trained checkpoints to score with their config's CAM settings as they are now "
                             "(needs --name); with --strip or --sweep one, whose CAMs to draw or to sweep")  # fmt: skip
    parser.add_argument("--classes", nargs="+", default=None, help="with --cams: the classes, one band each")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep the background threshold and the label CRF kernels (train / val)")  # fmt: skip
    args = parser.parse_args()
    if (args.overrides or args.gen_settings) and not args.name:
        parser.error("--set and --gen need --name: a variant must not overwrite the default runs")
    try:
        settings = generator_settings(args.generator, args.gen_settings)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cams and (args.strip or args.sweep) and len(args.cams) > 1:
        parser.error("--cams with --strip or --sweep takes one checkpoint")
    data = dataset(args.generator, args.train, args.val, args.data_seed, args.work, settings)
    if args.strip:
        if args.cams:
            cam_strip(args.cams[0], data, args.strip, args.classes or list(VOCDataset(data, "val").classes[1:]))
        else:
            sample_strip(data, args.strip)
        return
    name = f"transfer_{args.generator}" + (f"_{args.name}" if args.name else "")
    if args.cams and args.sweep:
        ckpt = args.cams[0]
        result = sweeps(ckpt, data)
        crf = result["crf"]
        print(f"{ckpt}: val seeds {100 * crf['val_unrefined']:.1f}, label CRF row C {100 * crf['val_row_c']:.1f}, "
              f"picked on train {crf['picked']} -> val {100 * crf['val_at_picked']:.1f}")  # fmt: skip
        write_result(name, {"generator": args.generator, "generator_settings": settings, "data": str(data),
                            "checkpoint": str(ckpt), **result})  # fmt: skip
        return
    if args.cams:
        if not args.name:
            parser.error("--cams alone (scoring trained checkpoints) needs --name")
        runs = rescore(args.cams, data, args.work, args.overrides)
        report(runs)
        write_result(name, {"generator": args.generator, "generator_settings": settings, "data": str(data),
                            "overrides": args.overrides, "runs": runs, "summary": summarize(runs)})  # fmt: skip
        chart(RESULTS / f"{name}.png", f"{name}: {args.generator} set", runs)
        return
    previous = RESULTS / f"{name}.json"
    runs: dict = json.loads(previous.read_text())["runs"] if args.resume and previous.is_file() else {}
    for config in args.configs:
        for seed in args.seeds:
            if str(seed) in runs.get(config, {}):
                continue
            out = args.work / data.name / f"{config}{'-' + args.name if args.name else ''}-s{seed}"
            runs.setdefault(config, {})[str(seed)] = result = run(config, seed, data, out, args.overrides, args.sweep)
            print(f"{config} seed {seed}: train {result['train_s']:.0f} s, " + run_line(result))
            payload = {"generator": args.generator, "generator_settings": settings, "data": str(data),
                       "overrides": args.overrides, "runs": runs, "summary": summarize(runs)}  # fmt: skip
            write_result(name, payload)
    report(runs)
    chart(RESULTS / f"{name}.png", f"{name}: {args.generator} set", runs)


if __name__ == "__main__":
    main()
