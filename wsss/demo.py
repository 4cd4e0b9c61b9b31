"""``wsss demo``: the main job on the embedded synthetic benchmark, end to end.

The default run trains SeCo's tiny student on a fifth of its schedule (``QUICK``; every step-counted setting
scaled alike by ``with_iters``), labels the validation images through the batch labeler, exports the
network to ONNX and makes their seeds again through ONNX Runtime (the seeds are what the network decides; the CRF
after them is the same code), scores seeds and masks, and writes the HTML report of the validation labels.
``full=True`` trains the config's own schedule, also labels the training images, and trains the final
segmentation network (``SEG_CONFIG``) on their CRF masks, scored on val under the §3.15 protocol.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from .cam.seg import seg_settings
from .data.datasets import VOCDataset
from .data.synth import SynthConfig, generate_synth
from .eval.evaluate import evaluate_folders, label_agreement, write_json
from .eval.metrics import format_table
from .export.run import run_export
from .runtime.backends import open_backend
from .runtime.labeler import LabelConfig, label_dataset
from .runtime.report import write_report
from .train.configs import get_config, with_iters
from .train.loop import train
from .train.seg import train_segmentation

CONFIG = "seco-tiny-synth"
SEG_CONFIG = "deeplab-tiny-synth"  # the final network of --full, trained on the training images' CRF masks
# A fifth of the schedule (seco-tiny-synth: 60 of 300 iterations), chosen by 3 training seeds against the plain
# CAM on the same budget (docs/benchmark.md); `--full` keeps the config's schedule.
QUICK = 1 / 5


def run_demo(out: str | Path, overrides=(), n_train: int = 1000, n_val: int = 300, config: str = CONFIG,
             iters: int | None = None, full: bool = False, seg_overrides=()) -> dict:  # fmt: skip
    """Generate, train, label (torch, then ONNX Runtime), evaluate, report; returns (and writes)
    ``out/results.json`` with each step's seconds under ``steps_s``."""
    out, t0 = Path(out), time.perf_counter()
    synth = out / "synth"
    steps: dict[str, float] = {}
    cfg = get_config(config, overrides)
    iters = iters or (None if full else round(QUICK * cfg["train"]["iters"]))
    if iters and iters != cfg["train"]["iters"]:
        cfg = with_iters(cfg, iters)
    splits = ("train", "val") if full else ("val",)

    with _step(steps, "generate", f"the synthetic benchmark in {synth}"):
        synth_cfg = SynthConfig(n_train=n_train, n_val=n_val)
        if not _same_synth(synth, synth_cfg):
            generate_synth(synth, synth_cfg)
    for stale in ("run", "onnx_val", "seg_run", "seg_val", "cam_train", "cam_val"):  # a re-run starts these afresh
        shutil.rmtree(out / stale, ignore_errors=True)
    with _step(steps, "train", f"{config}, {cfg['train']['iters']} iterations, pretrained {cfg['pretrained']}"):
        ckpt = train(cfg, VOCDataset(synth, "train"), out / "run")
    backend, spec, meta = open_backend(ckpt)
    names = spec.class_names
    results: dict = {"config": cfg, "checkpoint": str(ckpt), "full": full}

    with _step(steps, "label", f"seeds and dense-CRF masks of {' and '.join(splits)} (PyTorch)"):
        for split in splits:
            summary = label_dataset(backend, spec, meta, VOCDataset(synth, split), out / f"cam_{split}",
                                    _job(spec))  # fmt: skip
            results[f"{split}_cam_images_per_s"] = summary["ok"] / summary["stages_s"]["cam_s"]
            results[f"{split}_end_to_end_images_per_s"] = summary["images_per_s"]
    with _step(steps, "export", "ONNX, checked against PyTorch"):
        (onnx_path,) = run_export(ckpt, verify=True, echo=lambda _: None)
    with _step(steps, "label_onnx", "the val images' seeds again, through ONNX Runtime"):
        runner, spec_onnx, meta_onnx = open_backend(engine=onnx_path)
        seeds_only = LabelConfig(spec.cam, label_dir=None, seed_dir="seeds", quiet=True)  # the CRF is the network's
        label_dataset(runner, spec_onnx, meta_onnx, VOCDataset(synth, "val"), out / "onnx_val", seeds_only)
    with _step(steps, "evaluate", "seeds and masks against the ground truth"):
        val_ids = VOCDataset(synth, "val").ids
        for split in splits:
            ids = val_ids if split == "val" else VOCDataset(synth, split).ids
            for kind in ("seeds", "masks"):
                results[f"{split}_{kind}"] = evaluate_folders(
                    out / f"cam_{split}" / kind, synth / "SegmentationClass", names, synth / "ContextMask", ids=ids
                )
        results["onnx_agreement"] = label_agreement(out / "cam_val" / "seeds", out / "onnx_val" / "seeds", val_ids)
    if full:
        with _step(steps, "final_network", f"{SEG_CONFIG} on the train masks, val under the §3.15 protocol"):
            results["val_final"] = _final_network(synth, out, names, seg_overrides)
    with _step(steps, "report", f"{out}/cam_val/report.html"):
        results["report"] = str(write_report(out / "cam_val", VOCDataset(synth, "val")))
    results["steps_s"] = steps
    results["elapsed_s"] = time.perf_counter() - t0
    write_json(out / "results.json", results)
    _print_results(results, spec, out)
    return results


def _final_network(synth: Path, out: Path, names, overrides=()) -> dict:
    """Train the segmentation network on the training images' CRF masks; its val predictions (raw and + CRF)."""
    cfg = get_config(SEG_CONFIG, overrides)
    ckpt = train_segmentation(cfg, VOCDataset(synth, "train"), out / "cam_train" / "masks",
                              out / "seg_run", progress=False)  # fmt: skip
    backend, spec, meta = open_backend(ckpt, what="seg")
    job = LabelConfig(seg_settings(spec.cam), refine="crf", label_dir="masks", seed_dir="seeds", quiet=True,
                      source="seg")  # fmt: skip
    val = VOCDataset(synth, "val")
    label_dataset(backend, spec, meta, val, out / "seg_val", job)
    return {kind: evaluate_folders(out / "seg_val" / kind, synth / "SegmentationClass", names, synth / "ContextMask",
                                   ids=val.ids) for kind in ("seeds", "masks")}  # fmt: skip


def _job(spec) -> LabelConfig:
    return LabelConfig(spec.cam, refine="crf", label_dir="masks", seed_dir="seeds", quiet=True)


@contextmanager
def _step(steps: dict[str, float], name: str, what: str) -> Iterator[None]:
    """Time one step of the demo into ``steps[name]`` and announce it."""
    click.echo(f"[{len(steps) + 1}] {name}: {what}")
    tic = time.perf_counter()
    yield
    steps[name] = time.perf_counter() - tic


def _print_results(results: dict, spec, out: Path) -> None:
    names, settings = spec.class_names, spec.cam
    split = "train" if results["full"] else "val"
    for kind in ("seeds", "masks"):
        click.echo(f"\n{split} {kind} (CAM, bkg threshold {settings.bkg_thresh}{' + CRF' if kind == 'masks' else ''})")
        click.echo(format_table(results[f"{split}_{kind}"], names))
    click.echo("\nsummary                     mIoU   context false activation")
    for split in ("train", "val"):
        for kind in ("seeds", "masks"):
            if f"{split}_{kind}" in results:
                r = results[f"{split}_{kind}"]
                fa = r["context_false_activation"]["overall"]
                click.echo(f"  {split:5s} {kind:5s}             {100 * r['miou']:5.1f}%   {100 * fa:5.1f}%")
    if "val_final" in results:
        for kind, what in (("seeds", "raw"), ("masks", "+ CRF")):
            r = results["val_final"][kind]
            click.echo(f"  final {SEG_CONFIG} ({what}, val)  {100 * r['miou']:5.1f}%   "
                       f"{100 * r['context_false_activation']['overall']:5.1f}%")  # fmt: skip
    agree = results["onnx_agreement"]
    click.echo(f"ONNX Runtime vs PyTorch seeds: {agree['identical_images']} of {agree['images']} images identical, "
               f"{100 * agree['pixel_agreement']:.4f}% of pixels")  # fmt: skip
    click.echo(f"CAM inference: {results['val_cam_images_per_s']:.1f} images/s "
               f"({len(settings.scales)} scales x {'2 flips' if settings.flip else '1 view'}, CPU); end to end with "
               f"CRF and writing: {results['val_end_to_end_images_per_s']:.1f} images/s")  # fmt: skip
    click.echo("steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["steps_s"].items()))
    click.echo(f"done in {results['elapsed_s'] / 60:.1f} min; outputs in {out}; open {results['report']}")


def _same_synth(root: Path, cfg: SynthConfig) -> bool:
    stats = root / "synth_stats.json"
    return stats.is_file() and json.loads(stats.read_text()).get("config") == json.loads(json.dumps(cfg.__dict__))
