"""Command line: a thin layer over the Python API (``wsss --help``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__

# wsss.models.spec.SEED_SOURCES, repeated so that `wsss --help` does not import torch (tests/test_structure.py checks)
SEED_SOURCES = ("cnn", "vit", "avg", "max", "fuse")
CRF_IMPLS = ("auto", "torch", "pydensecrf")  # wsss.runtime.labeler.CRF_IMPLS, repeated for the same reason
DATA_HELP = "Dataset SPEC: voc:ROOT[:SPLIT], coco:ROOT[:SPLIT] or folder:DIR[:LABELS_FILE] (CSV or JSON)."


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 1.0,0.5,1.5, got {text!r}") from None


def _stages(text: str) -> tuple[int, ...]:
    """``1,2`` -> (1, 2); ``none`` -> ()."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected stage numbers like 1,2 or none, got {text!r}") from None


def _dataset(spec: str, classes=None):
    from .data.datasets import DatasetError, parse_data_spec

    try:
        return parse_data_spec(spec, classes)
    except DatasetError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="wsss")
def cli() -> None:
    """Weakly supervised semantic segmentation from image-level labels.

    \b
    Typical session on the embedded synthetic benchmark:
      wsss data synth data/synth
      wsss train --config cam-tiny-synth --data voc:data/synth:train --out runs/cam
      wsss cam --ckpt runs/cam/last.safetensors --data voc:data/synth:train --out runs/cam/seeds --refine crf
      wsss eval --pred runs/cam/seeds/masks --gt data/synth/SegmentationClass
    Or all of it at once: wsss demo
    """


# ---------------------------------------------------------------------------------------------------- data


@cli.group()
def data() -> None:
    """Create and inspect datasets."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "n_train", default=1000, show_default=True, help="Training images.")
@click.option("--val", "n_val", default=300, show_default=True, help="Validation images.")
@click.option("--min-size", default=96, show_default=True, help="Smallest image side in pixels.")
@click.option("--max-size", default=128, show_default=True, help="Largest image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Generator seed; the same seed gives the same files.")
@click.option("--corpus", type=click.Choice(["demo", "broad", "broad2"]), default="demo", show_default=True,
              help="demo: the 8 benchmark classes; broad: 24 random classes for backbone pre-training; broad2: 36 "
                   "shape / texture classes in random colours (pre-training candidate).")  # fmt: skip
def data_synth(out: Path, n_train: int, n_val: int, min_size: int, max_size: int, seed: int, corpus: str) -> None:
    """Generate the synthetic co-occurrence benchmark in PASCAL VOC layout.

    \b
    Boats sit on water, trains on rails and cows on grass most of the time, and people ride horses: the
    context is never labelled, so CAMs leak onto it. ContextMask/ holds those regions for `wsss eval --context`.
    Example: wsss data synth data/synth --train 1000 --val 300
    """
    from .data.synth import SynthConfig, generate_synth

    stats = generate_synth(out, SynthConfig(n_train, n_val, min_size, max_size, seed, corpus=corpus))
    click.echo(f"wrote {n_train} train + {n_val} val images to {out}")
    _echo_cooccurrence(stats)


def _echo_cooccurrence(stats: dict) -> None:
    for name, row in stats["per_class"].items():
        if "context" in row:
            click.echo(f"  {name:8s} P({row['context']}|{name}) = {row['p_context_given_class']:.2f}   "
                       f"P({name}|{row['context']}) = {row['p_class_given_context']:.2f}")  # fmt: skip
    for pair, p in stats["p_b_given_a"].items():
        a, b = pair.split("|")
        click.echo(f"  P({a}|{b}) = {p:.2f}")


@data.command("probe")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "n_train", default=1000, show_default=True, help="Training images.")
@click.option("--val", "n_val", default=300, show_default=True, help="Validation images.")
@click.option("--min-size", default=80, show_default=True, help="Smallest image side in pixels.")
@click.option("--max-size", default=112, show_default=True, help="Largest image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Generator seed; the same seed gives the same files.")
def data_probe(out: Path, n_train: int, n_val: int, min_size: int, max_size: int, seed: int) -> None:
    """Generate the probe set: a second co-occurrence benchmark, made apart from `data synth`, to measure on.

    \b
    Seven classes told by outline (arrow, crescent, heart, nut, bolt) or by pattern alone (rings, zigzag on a
    random blob), every instance in random colours, on noise, tiles, clutter or flat backgrounds. Unlabelled
    context: sand under nuts, a brick wall behind bolts, foliage around zigzags; an arrow comes with most hearts.
    Same VOC layout as `data synth` (ContextMask/ for `wsss eval --context`). The tiny backbones never saw it:
    use it to check that a recipe's score on the demo set transfers (benchmarks/transfer.py, docs/transfer.md).
    Example: wsss data probe data/probe --train 1000 --val 300
    """
    from .data.probe import ProbeConfig, generate_probe

    stats = generate_probe(out, ProbeConfig(n_train, n_val, min_size, max_size, seed))
    click.echo(f"wrote {n_train} train + {n_val} val probe images to {out}")
    _echo_cooccurrence(stats)


# ---------------------------------------------------------------------------------------------------- train


@cli.command()
@click.option(
    "--config", "config_name", required=True, help="Named config <method>-<size>-<data>, e.g. cam-tiny-synth."
)
@click.option("--data", "data_spec", required=True, help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--val", "val_spec", default=None, help="Validation SPEC for periodic seed mIoU (train.eval_every).")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value, e.g. train.iters=500."
)
@click.option("--seed", default=0, show_default=True)
@click.option("--pretrained", default=None, help="Local backbone weights (.safetensors/.pth); overrides the config's.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.safetensors and its optimizer state.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available).")
@click.option("--pretrained-cnn", default=None, help="CoBra: local ResNet weights for the CNN branch.")
@click.option("--no-cap", is_flag=True, help="CoBra ablation: drop the CAP loss (CNN projection, ViT affinity).")
@click.option("--no-sap", is_flag=True, help="CoBra ablation: drop the SAP loss (ViT projection, CNN pseudo labels).")
@click.option("--no-cam-loss", is_flag=True, help="CoBra ablation: drop the L1 CAM consistency loss.")
@click.option(
    "--seed-source",
    type=click.Choice(SEED_SOURCES),
    default=None,
    help="CoBra: which CAM the seeds come from (default fuse: max((M_cnn + M_tran) / 2, M_tran)).",
)
@click.option("--list-configs", is_flag=True, is_eager=True, expose_value=False,
              callback=lambda c, p, v: _list_configs(c, v), help="List the named configs and exit.")  # fmt: skip
@click.option("--masks", "masks_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Segmentation configs (deeplab-*, segformer-*): the pseudo-masks, DIR/ID.png for every image "
                   "(wsss label, wsss cobra-masks or any palette PNGs; 255 ignored).")  # fmt: skip
def train(config_name, data_spec, out, val_spec, overrides, seed, pretrained, resume, device, pretrained_cnn,
          no_cap, no_sap, no_cam_loss, seed_source, masks_dir) -> None:  # fmt: skip
    """Train a network from image-level labels; leaves OUT/last.safetensors.

    \b
    Example (CPU, minutes):
      wsss train --config cam-tiny-synth --data voc:data/synth:train --out runs/cam
    Example (GPU, VOC with local ImageNet weights; multi-GPU: torchrun --nproc-per-node 4 -m wsss.cli train ...):
      wsss train --config cam-vitb16-voc --data voc:VOCdevkit/VOC2012:train_aug --val voc:VOCdevkit/VOC2012:val \\
                 --pretrained jx_vit_base_p16_224-80ecf9dd.pth --out runs/voc
    Example (CoBra, both branches from local ImageNet weights, without the CAP loss):
      wsss train --config cobra-r152-deits-voc --data voc:VOCdevkit/VOC2012:train_aug \\
                 --pretrained deit_small_patch16_224-cd65a155.pth --pretrained-cnn resnet152-b121ed2d.pth --no-cap
    Example (the final segmentation network on pseudo-masks from wsss label):
      wsss train --config deeplab-r101-voc --data voc:VOCdevkit/VOC2012:train_aug --masks runs/label/labels \\
                 --pretrained resnet101-63fe2227.pth --out runs/deeplab
    Progress goes to OUT/metrics.jsonl; Ctrl-C saves a checkpoint, --resume continues.
    """
    from .train.configs import get_config
    from .train.loop import train as run_training

    flags = {"cobra.cap": no_cap, "cobra.sap": no_sap, "cobra.cam_loss": no_cam_loss}
    overrides = [*(f"{key}=false" for key, on in flags.items() if on), *overrides]
    if pretrained_cnn:
        overrides.append(f"pretrained_cnn={json.dumps(pretrained_cnn)}")
    if seed_source:
        overrides.append(f"cam.source={seed_source}")
    try:
        cfg = get_config(config_name, overrides)
    except (KeyError, ValueError, TypeError) as err:
        raise click.BadParameter(str(err).strip("\"'")) from None
    data = _dataset(data_spec)
    if masks_dir is not None or cfg["method"] == "segnet":
        data = _masked(data, masks_dir, cfg)
    if cfg["method"] == "sccam":  # SC-CAM's rounds, each a training run (§7.2)
        from .train.sccam_rounds import train_rounds as run_training
    try:
        path = run_training(cfg, data, out, val=_dataset(val_spec) if val_spec else None,
                            pretrained=pretrained, resume=resume, device=device, seed=seed)  # fmt: skip
    except KeyboardInterrupt as stop:
        click.echo(f"\n{stop}", err=True)
        sys.exit(130)
    click.echo(f"checkpoint: {path}")


def _masked(data, masks_dir: Path | None, cfg: dict):
    """The dataset with the pseudo-masks of ``--masks`` (a segmentation config without it trains on the dataset's
    own masks); refused in one line for configs that learn from tags."""
    from .data.datasets import DatasetError
    from .data.masks import MaskedDataset

    if cfg["method"] != "segnet":
        raise click.BadParameter(f"{cfg['name']} learns from image-level tags; --masks is for segmentation "
                                 "configs (deeplab-*, segformer-*)", param_hint="--masks")  # fmt: skip
    if masks_dir is None:
        return data
    try:
        return MaskedDataset(data, masks_dir)
    except DatasetError as err:
        raise click.BadParameter(str(err), param_hint="--masks") from None


def _list_configs(ctx: click.Context, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .train.configs import config_summaries

    for name, summary in config_summaries().items():
        click.echo(f"{name:20s} {summary}")
    ctx.exit()


# ---------------------------------------------------------------------------------------------------- cam


def _cam_options(command):
    """Options shared by `cam` and `label`: how CAMs become labels and how the work is spread."""
    options = [
        click.option("--scales", default=None, help="CAM scales, e.g. 1.0,0.5,1.5 (default: the checkpoint's)."),
        click.option("--flip/--no-flip", default=True, show_default=True, help="Add horizontally flipped inputs."),
        click.option("--bkg-thresh", type=float, default=None,
                     help="Background threshold (default: the config's); for CoBra networks the percentile of the "
                          "class-token attention that scores background (cam.bg_percentile, e.g. 70)."),
        click.option("--seed-source", type=click.Choice(SEED_SOURCES), default=None,
                     help="CoBra networks: the CAM seeds come from (default: the checkpoint's, fuse)."),
        click.option("--input-size", type=int, default=None,
                     help="Square inference size (default: the checkpoint's); 0 keeps each image's own size."),
        click.option("--layers", default=None,
                     help="LayerCAM (plain CAM on a VGG trunk, torch backend): trunk stages whose gradient-weighted "
                          "maps are averaged with the CAM, e.g. 1,2 (default: the checkpoint's cam.layers); none: "
                          "the CAM alone."),
        click.option("--crf-impl", type=click.Choice(CRF_IMPLS), default="auto", show_default=True,
                     help="Who runs --refine crf (one model, labels agree on >= 99.9% of pixels): torch, batched on "
                          "the device (per image in the pool on a CPU), or pydensecrf in the process pool; auto: "
                          "torch on a GPU, pydensecrf on a CPU (faster there) where installed."),
        click.option("--batch", default=16, show_default=True, help="Images per forward pass."),
        click.option("--workers", default=2, show_default=True, help="Decoding, CRF and writer pool size."),
        click.option("--overlays", default=0, show_default=True, help="Overlay strips for the first K images."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (the GPU that runs it)."),
        click.option("--source", type=click.Choice(["cam", "seg"]), default="cam", show_default=True,
                     help="seg: the network's segmentation decoder under §3.15's protocol (scales 1.0,1.25,1.5 unless "
                          "--scales, flips summed, max over scales, softmax; --refine crf: §5.3 row A), for SeCo "
                          "and segmentation networks (deeplab-*, segformer-*) or a wsss export --what seg graph."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _prepare(ckpt, engine, backend, device, use_compile, data_spec, scales, flip, bkg_thresh, input_size, seed_source,
             layers=None, source="cam", opener=None):  # fmt: skip
    """Backend, spec, metadata, CAM (or §3.15 segmentation) settings and dataset of a labeling job (``opener``: how
    the backend opens, by default here)."""
    from .cam.seg import seg_settings

    runner, spec, meta = (opener or _open_backend)(ckpt, engine, backend, device, use_compile, source)
    try:
        base = seg_settings(spec.cam) if source == "seg" else spec.cam
        settings = base.override(scales and _floats(scales), flip, bkg_thresh, input_size, seed_source,
                                 layers and _stages(layers))  # fmt: skip
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    dataset = _dataset(data_spec, spec.class_names if data_spec.startswith("folder:") else None)
    return runner, spec, meta, settings, dataset


def _run_labeler(runner, spec, meta, dataset, out, cfg, cluster=None) -> dict:
    from .data.datasets import DatasetError
    from .runtime.labeler import check_source, label_dataset

    try:
        check_source(runner, cfg)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--source") from None
    try:
        if cluster is not None:  # runner: the replicas' network (_ray_opener)
            from .runtime.cluster import label_on_ray

            return label_on_ray(runner, dataset, out, cfg, cluster)
        return label_dataset(runner, spec, meta, dataset, out, cfg)
    except FileExistsError as err:
        raise click.ClickException(str(err)) from None
    except DatasetError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None


@cli.command()
@click.option("--ckpt", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data_spec", required=True, help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--refine", type=click.Choice(["none", "crf", "par"]), default="none", show_default=True,
              help="crf: also write dense-CRF masks (§5.3 row C) to OUT/masks; par: PAR masks.")  # fmt: skip
@_cam_options
def cam(ckpt, data_spec, out, refine, scales, flip, bkg_thresh, seed_source, input_size, layers, crf_impl, batch,
        workers, overlays, device, source):  # fmt: skip
    """Multi-scale + flip CAMs -> seeds (OUT/seeds/ID.png) and optional CRF masks (OUT/masks/ID.png).

    \b
    Example:
      wsss cam --ckpt runs/cam/last.safetensors --data voc:data/synth:train --out runs/cam/train --refine crf
    The same pipeline as `wsss label`, keeping the seeds too. Images without tags (folder:DIR) use the classes
    the classifier predicts (sigmoid > cam.score_thresh).
    With --source seg: OUT/seeds holds the decoder's raw §3.15 prediction, OUT/masks (--refine crf) its CRF
    (§5.3 row A), e.g. wsss cam --ckpt runs/seco/last.safetensors --data voc:data/synth:val --out runs/seco/seg \\
    --source seg --refine crf, then wsss eval --pred runs/seco/seg/masks --gt data/synth/SegmentationClass.
    """
    from .runtime.labeler import LabelConfig, crf_implementation

    runner, spec, meta, settings, dataset = _prepare(ckpt, None, "torch", device, False, data_spec, scales, flip,
                                                     bkg_thresh, input_size, seed_source, layers, source)  # fmt: skip
    cfg = LabelConfig(settings, refine, "masks" if refine != "none" else None, "seeds", batch, workers,
                      overlays=overlays, crf_impl=crf_impl, source=source)  # fmt: skip
    try:
        crf_implementation(cfg, device)
    except RuntimeError as err:  # pydensecrf asked for, not installed
        raise click.BadParameter(str(err), param_hint="--crf-impl") from None
    summary = _run_labeler(runner, spec, meta, dataset, out, cfg)
    click.echo(f"{summary['ok']} images ({summary['failed']} failed), {summary['images_per_s']} images/s -> {out}")


@cli.command("cobra-masks")
@click.option("--ckpt", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A CoBra checkpoint (wsss train --config cobra-...) or a file of the official pair.")  # fmt: skip
@click.option("--vit-ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Official CoBra only: the ViT file (default: found next to --ckpt by name).")  # fmt: skip
@click.option("--data", "data_spec", required=True, help=DATA_HELP + " Images need their tags.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--irn", "irn_preset", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True,
              help="IRN schedule: paper (crop 512, batch 32, 4 epochs) or tiny (crop 96, batch 8; CPU).")  # fmt: skip
@click.option("--irn-epochs", type=int, default=None, help="Override the IRN epochs.")
@click.option("--irn-pretrained", default=None,
              help="ImageNet weights for IRN's ResNet (default: the CoBra CNN branch's trained weights).")  # fmt: skip
@click.option(
    "--rw-source",
    type=click.Choice(["tran", "fuse"]),
    default="tran",
    show_default=True,
    help="Map the random walk diffuses: the ViT CAM (official code) or the fused CAM (paper figures).",
)
@click.option("--pad-size", default=512, show_default=True, help="IRN inference canvas; images must fit in it.")
@click.option("--ir-thresholds", default="dynamic", show_default=True,
              help="IR-label thresholds: 'dynamic' (4.21) from the class-token attention (calibrated for DeiT-S at "
                   "7 scales) or FG,BG constants such as IRN's 0.30,0.05.")  # fmt: skip
@click.option(
    "--rw-exp-times",
    type=int,
    default=None,
    help="Random-walk length: T is squared this many times (default 8, T^256; 0 skips the walk).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda or cuda:N for every stage (default: cuda if available).")
def cobra_masks(ckpt, vit_ckpt, data_spec, out, irn_preset, irn_epochs, irn_pretrained, rw_source, pad_size,
                ir_thresholds, rw_exp_times, seed, device) -> None:  # fmt: skip
    """CoBra's masks: IR labels -> IRN -> random walk -> relative threshold + CRF (§4.9, §4.10).

    \b
    Example:
      wsss cobra-masks --ckpt runs/cobra/last.safetensors --data voc:data/synth:train --out runs/cobra/masks \\
                       --irn tiny
    Writes OUT/ir_labels/ID.png, OUT/irn.safetensors and OUT/masks/ID.png; rerunning resumes where it stopped.
    IRN's ResNet has the CoBra CNN's architecture (output stride 16); score the masks with `wsss eval`.
    """
    from .data.datasets import DatasetError
    from .models import CheckpointError, load_model
    from .train.cobra_masks import cobra_masks as run

    fixed = None if ir_thresholds == "dynamic" else _floats(ir_thresholds)
    if fixed is not None and len(fixed) != 2:
        raise click.BadParameter("give 'dynamic' or two numbers FG,BG", param_hint="--ir-thresholds")
    try:
        loaded = load_model(ckpt, vit_path=vit_ckpt)
        data = _dataset(data_spec, loaded.spec.class_names if data_spec.startswith("folder:") else None)
        masks = run(loaded, data, out, irn_preset, irn_epochs, irn_pretrained, rw_source, pad_size, fixed,
                    rw_exp_times, seed, device)  # fmt: skip
    except (CheckpointError, DatasetError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"masks -> {masks}")


# ---------------------------------------------------------------------------------------------------- eval


@cli.command("eval")
@click.option("--pred", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gt", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Ground-truth label PNGs (GT_DIR/ID.png); or --data.")  # fmt: skip
@click.option("--data", "data_spec", default=None,
              help="Instead of --gt: score exactly this dataset SPEC's ids against its own masks, with its classes "
                   "(e.g. voc:ROOT:val).")  # fmt: skip
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Class names, background first (default: GT_DIR/../classes.txt, else VOC; with --data: the "
                   "dataset's).")  # fmt: skip
@click.option("--context", "context", default=None, metavar="DIR|SPEC",
              help="Context masks for the false-activation figure: a DIR, or a dataset SPEC's ROOT/ContextMask "
                   "(default with --data: the dataset's ROOT/ContextMask where it has one).")  # fmt: skip
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every figure here.")
@click.option("--allow-missing", is_flag=True, help="Score only images that have a prediction.")
def eval_cmd(pred, gt, data_spec, classes_file, context, json_path, allow_missing) -> None:
    """Score a folder of label PNGs against ground truth: mIoU, per-class IoU, precision, recall.

    \b
    Examples:
      wsss eval --pred runs/cam/val/masks --data voc:data/synth:val       # that split's ids, masks and context
      wsss eval --pred runs/cam/train/masks --gt data/synth/SegmentationClass --context data/synth/ContextMask
    Only ids present in PRED are scored with --allow-missing; otherwise every GT id (every id of the split, with
    --data) needs a prediction. mIoU is the mean over classes present in the ground truth; 255 in the ground truth
    is ignored.
    """
    from .eval.evaluate import dataset_context_dir, evaluate_dataset, evaluate_folders, list_predictions, write_json
    from .eval.metrics import format_table

    if (gt is None) == (data_spec is None):
        raise click.UsageError("give the ground truth as --gt DIR or as --data SPEC (one of them, not both)")
    data = None if data_spec is None else _dataset(data_spec)
    names = _class_names(classes_file, gt) if data is None else _data_classes(data, classes_file)
    context_dir = _context_dir(context) if context is not None else data and dataset_context_dir(data)
    ids = list_predictions(pred) if allow_missing else None
    try:
        if data is None:
            result = evaluate_folders(pred, gt, names, context_dir=context_dir, allow_missing=allow_missing, ids=ids)
        else:
            ids = ids and [i for i in data.ids if i in set(ids)]
            result = evaluate_dataset(pred, data, context_dir=context_dir, allow_missing=allow_missing, ids=ids)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_table(result, names))
    if "context_false_activation" in result:
        click.echo(f"context false activation: {100 * result['context_false_activation']['overall']:.1f}% "
                   f"(context masks: {context_dir})")  # fmt: skip
    if json_path:
        write_json(json_path, result)


def _data_classes(data, classes_file: Path | None) -> tuple[str, ...]:
    """A dataset's classes; a --classes file given as well must list the same."""
    from .data.datasets import DatasetError, check_classes, read_classes_file

    if classes_file is not None:
        try:
            check_classes(data, read_classes_file(classes_file), f"--classes {classes_file}")
        except DatasetError as err:
            raise click.BadParameter(str(err), param_hint="--classes") from None
    return data.classes


def _context_dir(value: str) -> Path:
    """--context: a folder, or a dataset SPEC whose ROOT/ContextMask is meant."""
    from .eval.evaluate import dataset_context_dir

    if value.split(":", 1)[0].lower() in ("voc", "coco", "folder"):
        found = dataset_context_dir(_dataset(value))
        if found is None:
            raise click.BadParameter(f"dataset {value!r} has no ContextMask folder", param_hint="--context")
        return found
    if not Path(value).is_dir():
        raise click.BadParameter(f"{value}: not a folder (nor a dataset SPEC)", param_hint="--context")
    return Path(value)


def _class_names(classes_file: Path | None, gt: Path) -> tuple[str, ...]:
    from .data.datasets import read_classes_file
    from .data.palette import VOC_CLASSES

    for candidate in (classes_file, gt.parent / "classes.txt"):
        if candidate is not None and candidate.is_file():
            return read_classes_file(candidate)
    return VOC_CLASSES


# ---------------------------------------------------------------------------------------------------- demo


@cli.command()
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config_name", default="seco-tiny-synth", show_default=True,
              help="Tiny config to train (cam-tiny-synth for the plain-CAM baseline).")  # fmt: skip
@click.option("--iters", type=int, default=None,
              help="Iterations, the schedule scaled alike (default: a fifth; --full: the config's).")  # fmt: skip
@click.option("--full", is_flag=True, help="The config's whole schedule, and the training images labelled too.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config overrides, as for train.")
@click.option("--train-images", default=1000, show_default=True)
@click.option("--val-images", default=300, show_default=True)
def demo(out, config_name, iters, full, overrides, train_images, val_images) -> None:
    """The main job on the embedded benchmark, one command (about 5 minutes on 2 CPU cores).

    Generates the synthetic set, trains SeCo's tiny student from the shipped pre-trained backbone (60
    iterations, a fifth of its schedule), writes seeds and dense-CRF masks of the validation images through the
    batch labeler, exports the network to ONNX and makes the seeds again through ONNX Runtime, then prints the
    mIoU tables, the context false-activation figure, the two backends' agreement and each step's time, and writes
    OUT/cam_val/report.html. --full also trains the final segmentation network on the training images' masks.
    Everything lands in OUT.

    \b
    Example:
      wsss demo --out demo_out                                  # the README's `make demo`
      wsss demo --full --out demo_full                          # 300 iterations, train and val labelled
      wsss demo --config cam-tiny-synth --out demo_cam          # the plain-CAM baseline
    """
    from .demo import run_demo

    run_demo(out, overrides, train_images, val_images, config_name, iters=iters, full=full)


# ---------------------------------------------------------------------------------------------------- later


@cli.group(invoke_without_command=True)
@click.option(
    "--ckpt",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A wsss checkpoint, an official SeCo .pth or a file of the official CoBra pair (PyTorch).",
)
@click.option(
    "--engine",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Exported .onnx (ONNX Runtime) or .engine (TensorRT) file.",
)
@click.option("--data", "data_spec", help=DATA_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option(
    "--backend",
    type=click.Choice(["torch", "onnx", "onnx-trt", "trt"]),
    default=None,
    help="Default: torch for --ckpt, by file suffix for --engine (onnx: ONNX Runtime on the CPU or its CUDA "
    "provider; onnx-trt: its TensorRT provider, engines cached in NAME.trt-cache next to the .onnx; trt: a "
    "TensorRT engine from wsss export --trt).",
)
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the network (torch backend).")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="The network's forward: autocast for the torch backend (fp16 on CUDA only; CAM post-processing and "
    "thresholds stay float32), fp16 engines for onnx-trt; a trt engine runs at the precision it was built with.",
)
@click.option(
    "--refine",
    type=click.Choice(["none", "crf", "par"]),
    default="crf",
    show_default=True,
    help="crf: dense CRF (§5.3 row C; --crf-impl says who runs it); par: pixel-adaptive refinement on the device.",
)
@click.option("--shard", default=None, metavar="I/N", help="Take shard I of N (automatic under torchrun).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in OUT (finished items are skipped).")
@click.option("--keep-seeds", is_flag=True,
              help="Also write the unrefined seeds to OUT/seeds/ID.png (with --refine crf|par), e.g. for classes "
                   "the CRF erases: patterns whose colours repeat around them.")  # fmt: skip
@click.option("--save-cams", is_flag=True,
              help="Also write the K CAMs, float16, to OUT/cams/ID.npz (compressed; keys cams, tags, image_size). "
                   "Raw 2*K*H*W*S^2 bytes (S: --cams-scale); compressed, measured for a 500x375 image with K=8 "
                   "classes (3 tagged): 0.54 MB at S=1 (raw 3.0 MB), 41 kB at S=0.25 (raw 188 kB).")  # fmt: skip
@click.option("--cams-scale", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="--save-cams: downscale the CAMs by this factor (bilinear, on the device), e.g. 0.25.")  # fmt: skip
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["png", "coco-rle"]),
    default="png",
    show_default=True,
    help="coco-rle: also write OUT/pseudo_labels_coco.json.",
)
@click.option("--fail-on-error", is_flag=True, help="Exit non-zero if any image failed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--report", is_flag=True,
              help="Also write OUT/report.html: counts, failures, pixel shares, a gallery lowest-confidence first, "
                   "per-class IoU where the dataset has masks (or --report-gt); static, opens from the "
                   "disk.")  # fmt: skip
@click.option("--report-gt", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="--report: score against these ground-truth PNGs (GT_DIR/ID.png) instead of the dataset's "
                   "masks.")  # fmt: skip
@click.option("--report-gallery", default=48, show_default=True, help="--report: overlays in the gallery.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on a Ray cluster (pip install 'wsss[ray]'): at ADDRESS, else RAY_ADDRESS, else a new "
                   "local one; the network in --replicas actors, decoding, CRF and writing in CPU tasks "
                   "(docs/cluster.md).")  # fmt: skip
@click.option("--replicas", type=click.IntRange(1), default=None,
              help="--ray: network replicas (default: one per GPU of the cluster with --device cuda, "
                   "else 1).")  # fmt: skip
@_cam_options
@click.pass_context
def label(
    ctx,
    ckpt,
    engine,
    data_spec,
    out,
    backend,
    use_compile,
    precision,
    refine,
    shard,
    resume,
    keep_seeds,
    save_cams,
    cams_scale,
    fmt,
    fail_on_error,
    quiet,
    report,
    report_gt,
    report_gallery,
    ray_address,
    replicas,
    scales,
    flip,
    bkg_thresh,
    seed_source,
    input_size,
    layers,
    crf_impl,
    batch,
    workers,
    overlays,
    device,
    source,
) -> None:
    """Pseudo-label a dataset in batch: resumable, sharded, every core busy.

    \b
    Examples:
      wsss label --ckpt runs/cam/last.safetensors --data folder:photos:tags.csv --out labels --refine crf
      wsss label --engine cam.onnx --data voc:VOC2012:train_aug --out labels --shard 0/4   # one of 4 machines
      wsss label ... --resume            # after a crash or kill: finishes the job, redoing nothing twice
      wsss label merge labels            # one summary.json from all shards
      wsss label --ckpt M.safetensors --device cuda:1 --precision bf16 ...   # GPU 1, bf16 network forward
      wsss label --ckpt runs/deeplab/last.safetensors --source seg ...   # a decoder's §3.15 prediction + CRF
    Writes OUT/labels/ID.png (VOC palette, original resolution), OUT/summary.json (counts, failures and their
    reasons, seconds per stage, a timeline of each stage's busy fraction and the one that bounds the run,
    configuration, checkpoint hash). Bad images are recorded, never fatal. folder:DIR walks subfolders; an id is
    the path relative to DIR without extension (kept where two files share a stem), outputs OUT/labels/ID.png.
    --report adds OUT/report.html (docs/report.md).
    Without image tags the classifier's own predictions pick the classes (sigmoid > 0.5, at least the top one).
    """
    if ctx.invoked_subcommand is not None:
        return
    from .export.tensorrt import ProfileError
    from .runtime.labeler import LabelConfig, crf_implementation, shard_from_env

    if data_spec is None or out is None:
        raise click.UsageError("--data and --out are required (and one of --ckpt / --engine)")
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if replicas is not None and ray_address is None:
        raise click.UsageError("--replicas: only with --ray")
    if keep_seeds and refine == "none":
        raise click.BadParameter("without --refine crf|par the labels are the seeds", param_hint="--keep-seeds")
    cluster = None if ray_address is None else _ray_cluster(ray_address, replicas)
    opener = None if cluster is None else _ray_opener(cluster, precision)
    try:
        runner, spec, meta, settings, dataset = _prepare(ckpt, engine, backend, device, use_compile, data_spec,
                                                         scales, flip, bkg_thresh, input_size, seed_source,
                                                         layers, source, opener)  # fmt: skip
    except RuntimeError as err:  # an execution provider or engine that cannot start here
        raise click.ClickException(str(err)) from None
    shard = _parse_shard(shard) or shard_from_env() or (0, 1)
    cfg = LabelConfig(settings, refine, seed_dir="seeds" if keep_seeds else None, batch=batch, workers=workers,
                      shard=shard, resume=resume, save_cams=save_cams, format=fmt, overlays=overlays, quiet=quiet,
                      precision=precision, crf_impl=crf_impl, cams_scale=cams_scale, source=source)  # fmt: skip
    try:
        crf_implementation(cfg, device)
    except RuntimeError as err:  # pydensecrf asked for, not installed
        raise click.BadParameter(str(err), param_hint="--crf-impl") from None
    try:
        runner = runner if cluster else runner.at_precision(precision)  # on Ray: checked where the replicas run
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--precision") from None
    try:
        summary = _run_labeler(runner, spec, meta, dataset, out, cfg, cluster)
    except ProfileError as err:  # an image size outside a TensorRT profile
        raise click.ClickException(str(err)) from None
    click.echo(f"{summary['ok']} labelled, {summary['failed']} failed, {summary.get('skipped', 0)} skipped, "
               f"{summary['images_per_s']} images/s -> {out}")  # fmt: skip
    if report:
        _write_report(out, dataset, report_gt, report_gallery, data_spec, shard)
    if fail_on_error and summary["failed"]:
        sys.exit(1)


def _ray_cluster(address: str, replicas: int | None):
    """``--ray [ADDRESS]``: the cluster to run on; a one-line error naming the extra where Ray is missing."""
    from .runtime.cluster import ClusterConfig, connect

    cluster = ClusterConfig(address or None, replicas)
    try:
        connect(cluster)
    except (RuntimeError, ConnectionError) as err:  # no Ray, or no cluster at the address
        raise click.ClickException(str(err)) from None
    return cluster


def _ray_opener(cluster, precision: str):
    """Opens the network where a replica runs (``open_network``); errors as the local labeler gives them."""
    from .models import CheckpointError
    from .runtime.cluster import BackendSource, open_network

    def opener(ckpt, engine, backend, device, use_compile, what="cam"):
        try:
            network = open_network(BackendSource(ckpt, engine, backend, device, use_compile, what=what), precision,
                                   cluster)  # fmt: skip
        except (CheckpointError, ValueError) as err:
            raise click.BadParameter(str(err)) from None
        return network, network.spec, network.meta

    return opener


@label.command("merge")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def label_merge(out: Path) -> None:
    """Merge the shard summaries of OUT into OUT/summary.json. Example: wsss label merge labels"""
    from .runtime.labeler import merge_shards

    merged = merge_shards(out)
    click.echo(f"{merged['shards']} shards: {merged['ok']} labelled, {merged['failed']} failed"
               + (f"; missing shards {merged['missing_shards']}" if merged["missing_shards"] else ""))  # fmt: skip


@label.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_spec", default=None,
              help="The SPEC that was labelled: draws the gallery's overlays, scores against its masks.")  # fmt: skip
@click.option("--gt", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Ground-truth PNGs (GT_DIR/ID.png) to score against instead.")  # fmt: skip
@click.option("--gallery", default=48, show_default=True, help="Overlays in the gallery, lowest confidence first.")
def label_report(out: Path, data_spec: str | None, gt: Path | None, gallery: int) -> None:
    """Write OUT/report.html for a finished (or merged) run. Example: wsss label report labels --data folder:photos"""
    names = json.loads((out / "summary.json").read_text())["class_names"] if (out / "summary.json").is_file() else None
    dataset = None if data_spec is None else _dataset(data_spec, names if data_spec.startswith("folder:") else None)
    _write_report(out, dataset, gt, gallery, data_spec, (0, 1))


def _write_report(out: Path, dataset, gt: Path | None, gallery: int, data_spec: str, shard: tuple[int, int]) -> None:
    from .runtime.report import write_report

    if shard[1] > 1:
        click.echo(f"report: after the last shard, `wsss label merge {out}` then "
                   f"`wsss label report {out} --data {data_spec}`")  # fmt: skip
        return
    try:
        path = write_report(out, dataset, gt, gallery)
    except FileNotFoundError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"report -> {path}")


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N like 0/4, got {text!r}", param_hint="--shard") from None
    if not 0 <= index < count:
        raise click.BadParameter(f"need 0 <= I < N, got {text}", param_hint="--shard")
    return index, count


def _open_backend(ckpt, engine, backend, device, use_compile, what="cam"):
    from .models import CheckpointError
    from .runtime.backends import open_backend

    try:
        return open_backend(ckpt, engine, backend, device, use_compile, what=what)
    except (CheckpointError, ValueError) as err:
        raise click.BadParameter(str(err)) from None


@cli.command()
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Our .safetensors checkpoint, an official SeCo .pth state dict, or the CNN file of an official CoBra "
    "pair (ep19_cnn_checkpoint.pth).",
)
@click.option(
    "--vit-ckpt",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Official CoBra only: the ViT file (ep19_tf_checkpoint.pth); default: found next to --ckpt by name.",
)
@click.option(
    "--what",
    type=click.Choice(["cam", "seg", "both"]),
    default="cam",
    show_default=True,
    help="cam: image -> logits, CAMs (CoBra: the CNN CAMs and the ViT maps); seg: segmentation logits (SeCo).",
)
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file (default: next to the checkpoint, NAME.cam.onnx / NAME.seg.onnx).",
)
@click.option(
    "--trt",
    "trt_path",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[OUT.engine]",
    help="Also build a TensorRT engine (needs a GPU and pip install 'wsss[gpu]').",
)
@click.option("--fp16", is_flag=True, help="fp16 TensorRT engine.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (the dynamo exporter emits 18 or newer).")
@click.option("--dynamic/--static", default=True, show_default=True, help="Dynamic batch and image size.")
@click.option(
    "--normalize",
    is_flag=True,
    help="Add output 'cams_norm' at the input size, by the checkpoint's CAM rules: ReLU + per-class min-max "
    "normalised CAMs (CoBra: the fused seed map M_fuse of the max-normalised sources, then A_obj as is).",
)
@click.option("--min-shape", default=None, help="TensorRT profile minimum, e.g. 1x3x224x224 (default: see below).")
@click.option("--opt-shape", default=None, help="TensorRT profile optimum (default: see below).")
@click.option("--max-shape", default=None, help="TensorRT profile maximum (default: see below).")
@click.option(
    "--verify",
    is_flag=True,
    help="Compare ONNX Runtime (its CUDA provider with TF32 off, where it runs) with PyTorch at three sizes, and "
    "the engine with ONNX Runtime at the profile's min, opt and max shapes; fails on NaN/Inf or a larger error "
    "than the precision allows.",
)
@click.option("--simplify", is_flag=True, help="Run onnxslim on the exported graph.")
def export(ckpt, vit_ckpt, what, onnx_path, trt_path, fp16, opset, dynamic, normalize, min_shape,
           opt_shape, max_shape, verify, simplify) -> None:  # fmt: skip
    """Export a CAM or segmentation network to ONNX (and TensorRT), with metadata inside.

    \b
    Examples:
      wsss-export --ckpt runs/cam/last.safetensors --verify
      wsss-export --ckpt seco_voc.pth --what both --trt --fp16      # official SeCo weights, on a GPU
      wsss-export --ckpt ep19_cnn_checkpoint.pth --vit-ckpt ep19_tf_checkpoint.pth --verify   # official CoBra
    The ONNX input is 'image' (B,3,H,W, normalised as the spec says, any H and W; the token grid floors);
    outputs are 'logits' (B,K) and 'cams' (B,K,H//p,W//p) (CoBra: 'cams_cnn' (B,K,...) on the ResNet's grid and
    'cams_vit' (B,K+1,...) = attention-weighted ViT CAMs and the class-token attention), or 'seg' (B,C,...). The
    model spec (family, architecture, classes, normalisation, CAM rules), the version and the source
    checkpoints' SHA-256 are stored in the file's metadata; `wsss label --engine` reads them back.

    
    The default TensorRT profile serves `wsss label` with the checkpoint's CAM settings (flips double a batch;
    larger batches run in chunks):
      fixed input size S (SeCo, CAM): min 1x3xAxA, opt 16x3xSxS, max 16x3xBxB, A and B the smallest and largest
        scale of S (seco-vitb16-voc: 224, 448, 672)
      native size (CoBra): images up to 500 px a side at every scale (scales to 2.0: max 4x3x1000x1000), min one
        patch; larger images (COCO's 640) need an explicit --max-shape, e.g. 4x3x1280x1280
    `wsss label` refuses an image size outside the profile in one line naming the shape to export.
    """
    from .export.run import run_export

    try:
        run_export(ckpt, what=what, onnx_path=onnx_path, trt_path=trt_path, fp16=fp16, opset=opset, dynamic=dynamic,
                   normalize=normalize, shapes=(min_shape, opt_shape, max_shape), verify=verify, simplify=simplify,
                   echo=click.echo, vit_ckpt=vit_ckpt)  # fmt: skip
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None


@cli.group()
def bench() -> None:
    """Measure throughput (results as JSON with device information)."""


@bench.command("label")
@click.option("--ckpt", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data_spec", required=True, help=DATA_HELP)
@click.option("--images", default=200, show_default=True, help="Images to label (the first N of the dataset).")
@click.option("--batch", "batches", default="8,16", show_default=True, help="Batch sizes to try.")
@click.option(
    "--backends",
    default="torch,onnx",
    show_default=True,
    help="Backends to try: torch, onnx, onnx-trt (the last two from an ONNX export made here).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="The labeler's network forward, as for wsss label (the baseline runs fp32).",
)
@click.option("--refine", type=click.Choice(["none", "crf", "par"]), default="crf", show_default=True)
@click.option("--crf-impl", "crf_impls", default="auto", show_default=True,
              help="--refine crf: the labeler's CRF implementations to try, e.g. torch,pydensecrf (as for wsss "
                   "label; the baseline keeps pydensecrf).")  # fmt: skip
@click.option("--scales", default=None, help="CAM scales (default: the checkpoint's).")
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here.")
def bench_label_cmd(ckpt, data_spec, images, batches, backends, precision, refine, crf_impls, scales, workers, device,
                    json_path) -> None:  # fmt: skip
    """End-to-end images/second of `wsss label` per backend and batch size, against the research-code loop.

    \b
    Example:
      wsss bench label --ckpt demo_out/run/last.safetensors --data voc:demo_out/synth:val --json bench.json
    The baseline labels one image at a time with PyTorch eager and an in-process CRF, as research code does.
    Each labeler row shows its stage timeline: the busy fraction of decoding, forward, refinement and writing
    (busy seconds over wall time x parallel lanes) and the stage that bounds the run.
    """
    import json

    from .runtime.bench import bench_label

    sizes, impls = [int(b) for b in batches.split(",")], tuple(crf_impls.split(","))
    if set(impls) - set(CRF_IMPLS):
        raise click.BadParameter(f"expected some of {','.join(CRF_IMPLS)}, got {crf_impls!r}", param_hint="--crf-impl")
    try:
        result = bench_label(ckpt, _dataset(data_spec), scales and _floats(scales), images, sizes,
                             backends.split(","), refine, workers, device, precision=precision,
                             crf_impls=impls)  # fmt: skip
    except (ValueError, RuntimeError) as err:  # no such GPU, a precision, backend or CRF that cannot run here
        raise click.ClickException(str(err)) from None
    stages = ("decode", "forward", "refine", "write")
    click.echo(f"{'pipeline':14s} {'backend':8s} {'batch':>5s} {'crf':10s} {'img/s':>8s} {'speedup':>8s}  busy: "
               + " ".join(f"{s:>7s}" for s in stages) + "  bound by")  # fmt: skip
    for row in result["rows"]:
        line = (f"{row['pipeline']:14s} {row['backend']:8s} {row['batch']:5d} {row['crf_impl'] or '-':10s} "
                f"{row['images_per_s']:8.2f} {row['speedup']:7.2f}x")  # fmt: skip
        if "timeline" in row:
            busy = " ".join(f"{row['timeline'][s]['busy_fraction']:7.0%}" for s in stages)
            line += f"        {busy}  {row['timeline']['bound_by']}"
        click.echo(line)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))


@bench.command("pipeline")
@click.option("--data", "data_spec", required=True, help="Training images (stages on train_aug). " + DATA_HELP)
@click.option("--val", "val_spec", required=True, help="Validation images (final inference), a SPEC as --data.")
@click.option("--methods", default="seco,cobra,cam", show_default=True, help="Pipelines to time.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--warmup", default=2, show_default=True, help="Untimed optimiser steps per training stage.")
@click.option("--steps", default=5, show_default=True, help="Timed optimiser steps per training stage and style.")
@click.option("--images", default=8, show_default=True, help="Timed images per per-image stage.")
@click.option("--warmup-images", default=1, show_default=True, help="Untimed images before them.")
@click.option("--batch", type=int, default=None, help="Training batch (default: the paper's; scaled linearly).")
@click.option(
    "--walk-exp-times",
    type=int,
    default=None,
    help="Random-walk squarings to run (default: IRN's 8); the rest are added at a measured squaring.",
)
@click.option("--label-batch", default=8, show_default=True, help="The labeler's batch (ours).")
@click.option("--workers", default=2, show_default=True, help="Decode / CRF / IRN loader processes (ours).")
@click.option("--tiny", is_flag=True, help="CPU-sized stand-ins of the paper configs (smoke runs).")
@click.option("--budget-s", type=float, default=None, help="Stages not started within this time are not measured.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here.")
@click.option("--png", "png_path", type=click.Path(dir_okay=False, path_type=Path), help="Stacked-minutes chart.")
def bench_pipeline_cmd(data_spec, val_spec, methods, device, warmup, steps, images, warmup_images, batch,
                       walk_exp_times, label_batch, workers, tiny, budget_s, json_path, png_path) -> None:  # fmt: skip
    """Minutes per pipeline (seco, cobra, cam, seam, sccam), stage by stage, ours against the official code's style.

    \b
    Example (a GPU, the real figure; on a CPU use few steps and images, the result says "reduced"):
      wsss bench pipeline --data voc:VOC2012:train_aug --val voc:VOC2012:val --device cuda --json p.json --png p.png
    Steady-state steps after warm-up, projected to the paper's iterations and VOC image counts, printed beside
    SeCo's Table 4 (RTX 3090) and SeCo's log (1.61 s/iteration).
    """
    import json

    from .runtime.pipeline_bench import BenchOptions, bench_pipeline, plot_pipeline, table_lines

    opts = BenchOptions(warmup=warmup, steps=steps, images=images, warmup_images=warmup_images, batch=batch,
                        walk_exp_times=walk_exp_times, label_batch=label_batch, workers=workers, tiny=tiny,
                        budget_s=budget_s)  # fmt: skip
    try:
        result = bench_pipeline(_dataset(data_spec), _dataset(val_spec), methods.split(","), device, opts,
                                progress=click.echo)  # fmt: skip
    except (ValueError, RuntimeError, KeyError) as err:
        raise click.ClickException(str(err)) from None
    click.echo("\n".join(table_lines(result)))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    if png_path:
        plot_pipeline(result, png_path)


def main() -> None:
    cli(prog_name="wsss")


def _sub(name: str):
    def run() -> None:
        cli(args=[name, *sys.argv[1:]], prog_name=f"wsss-{name}")

    return run


train_main, label_main, export_main = _sub("train"), _sub("label"), _sub("export")

if __name__ == "__main__":
    main()
