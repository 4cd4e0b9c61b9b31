"""``wsss demo``: the main job on the embedded synthetic benchmark, end to end."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click

from .data.datasets import VOCDataset
from .data.synth import SynthConfig, generate_synth
from .eval.evaluate import evaluate_folders, write_json
from .eval.metrics import format_table
from .runtime.backends import open_backend
from .runtime.labeler import LabelConfig, label_dataset
from .train.configs import get_config
from .train.loop import train

CONFIG = "seco-tiny-synth"


def run_demo(out: str | Path, overrides=(), n_train: int = 1000, n_val: int = 300, config: str = CONFIG) -> dict:
    """Generate, train, make seeds and CRF masks, evaluate; returns (and writes) ``out/results.json``."""
    out, t0 = Path(out), time.perf_counter()
    synth = out / "synth"
    synth_cfg = SynthConfig(n_train=n_train, n_val=n_val)
    if not _same_synth(synth, synth_cfg):
        click.echo(f"[1/4] generating the synthetic benchmark in {synth}")
        generate_synth(synth, synth_cfg)
    for stale in ("run", "cam_train", "cam_val"):  # a re-run starts these afresh
        shutil.rmtree(out / stale, ignore_errors=True)
    cfg = get_config(config, overrides)
    click.echo(f"[2/4] training {config} ({cfg['train']['iters']} iterations, pretrained {cfg['pretrained']})")
    ckpt = train(cfg, VOCDataset(synth, "train"), out / "run")
    backend, spec, meta = open_backend(ckpt)
    settings = spec.cam

    click.echo("[3/4] seeds and dense-CRF masks")
    names = spec.class_names
    results: dict = {"config": cfg, "checkpoint": str(ckpt)}
    for split in ("train", "val"):
        job = LabelConfig(settings, refine="crf", label_dir="masks", seed_dir="seeds", overlays=8 * (split == "train"))
        summary = label_dataset(backend, spec, meta, VOCDataset(synth, split), out / f"cam_{split}", job)
        results[f"{split}_cam_images_per_s"] = summary["ok"] / summary["stages_s"]["cam_s"]
        results[f"{split}_end_to_end_images_per_s"] = summary["images_per_s"]
        for kind in ("seeds", "masks"):
            ids = (synth / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
            res = evaluate_folders(out / f"cam_{split}" / kind, synth / "SegmentationClass", names,
                                   context_dir=synth / "ContextMask", ids=ids)  # fmt: skip
            results[f"{split}_{kind}"] = res

    click.echo("[4/4] results")
    for split, kind in (("train", "seeds"), ("train", "masks")):
        click.echo(f"\n{split} {kind} (CAM, bkg threshold {settings.bkg_thresh}{' + CRF' if kind == 'masks' else ''})")
        click.echo(format_table(results[f"{split}_{kind}"], names))
    click.echo("\nsummary                     mIoU   context false activation")
    for split in ("train", "val"):
        for kind in ("seeds", "masks"):
            r = results[f"{split}_{kind}"]
            fa = r["context_false_activation"]["overall"]
            click.echo(f"  {split:5s} {kind:5s}             {100 * r['miou']:5.1f}%   {100 * fa:5.1f}%")
    click.echo(f"CAM inference: {results['train_cam_images_per_s']:.1f} images/s "
               f"({len(settings.scales)} scales x {'2 flips' if settings.flip else '1 view'}, CPU); end to end with "
               f"CRF and writing: {results['train_end_to_end_images_per_s']:.1f} images/s")  # fmt: skip
    results["elapsed_s"] = time.perf_counter() - t0
    write_json(out / "results.json", results)
    click.echo(f"done in {results['elapsed_s'] / 60:.1f} min; outputs in {out} (overlays: {out}/cam_train/overlays)")
    return results


def _same_synth(root: Path, cfg: SynthConfig) -> bool:
    stats = root / "synth_stats.json"
    return stats.is_file() and json.loads(stats.read_text()).get("config") == json.loads(json.dumps(cfg.__dict__))
