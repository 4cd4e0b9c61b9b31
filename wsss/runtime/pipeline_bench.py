"""``wsss bench pipeline``: minutes per WSSS pipeline, stage by stage, projected to the paper's schedule.

Each method is a row of :data:`PIPELINES`: its stages in order, each a training stage (seconds per optimiser step
of a named config, projected to that config's iterations) or a per-image stage (seconds per image, projected to the
image count the paper runs it on). A stage is timed twice in the same run: the package's implementation, and the
official code's style (loop-transcribed losses, single-process dense CRF, one image at a time). Stages whose code
has the same form in both (IRN, the segmentation network's training) are timed once and marked ``shared``.

Networks start from random weights (the timing does not depend on them) and every loss term is on from the first
step (the steady-state step of the recipe). Data loading is outside the timed window (the training loop's loader
prefetches in workers). On a CPU the run is reduced (a reduced batch scaled linearly to the paper's, a shortened
random walk completed with a measured squaring); the result says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..cam.crf import CRF_PRESETS, crf_from_probs
from ..data.datasets import WSSSDataset
from ..data.palette import save_label_png
from ..models import build_model
from ..train.cobra_masks import write_ir_labels, write_masks
from ..train.configs import get_config, model_spec
from ..train.irn import IRNConfig, cobra_irn_trunk, train_irn
from ..train.loop import _batches, build_training, train_step, training_set
from ..train.official_loops import has_official_losses, official_losses
from .backends import TorchBackend, select_device
from .bench import Subset, device_info, research_baseline
from .labeler import LabelConfig, label_dataset

# PASCAL VOC 2012 image counts (METHODS §8.2): train_aug trains the networks and is labelled for the final one.
VOC_IMAGES = {"train_aug": 10582, "train": 1464, "val": 1449}

# SeCo's Table 4 (S000; METHODS §9.1): minutes per pipeline on PASCAL VOC, one RTX 3090.
TABLE4 = {
    "device": "NVIDIA GeForce RTX 3090",
    "source": "SeCo (CVPR 2024) Table 4 (seed S000); METHODS §9.1",
    "rows": {
        "CLIMS": {"CAM": 101, "Refine": 332, "Decoder": 635},
        "AFA": {"total": 554},
        "ToCo": {"total": 506},
        "SeCo": {"total": 417},
    },
}
# SeCo's own VOC log (METHODS §9.2): 1 x RTX 3090, 4 images per iteration, training only.
SECO_LOG = {"s_per_iter": 1.61, "iterations": 20000, "batch": 4, "device": "NVIDIA GeForce RTX 3090",
            "source": "[SeCo] logs/voc_train.log; METHODS §9.2"}  # fmt: skip

# Table 4's columns: where each stage's minutes go.
COLUMNS = ("CAM", "Refine", "Decoder")


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: ``kind`` picks its timer, ``config`` the network, ``images`` (per-image stages)
    the VOC split it runs over in the paper; training stages take their iterations from the config."""

    name: str
    kind: str  # train | seeds | ir-labels | irn-train | masks | seg-train | seg-infer
    config: str
    column: str
    images: str | None = None

    @property
    def per_image(self) -> bool:
        return self.images is not None


_SEG = "deeplab-r101-voc"  # the final network of CoBra's first row and of most multi-stage papers (§4.1)
PIPELINES: dict[str, tuple[Stage, ...]] = {
    "seco": (
        Stage("SeCo training", "train", "seco-vitb16-voc", "CAM"),
        Stage("decoder inference (§3.15)", "seg-infer", "seco-vitb16-voc", "Decoder", "val"),
    ),
    "cobra": (
        Stage("CoBra training", "train", "cobra-r152-deits-voc", "CAM"),
        Stage("IR labels (maps, 2 CRFs)", "ir-labels", "cobra-r152-deits-voc", "Refine", "train_aug"),
        Stage("IRN training", "irn-train", "cobra-r152-deits-voc", "Refine"),
        Stage("masks (maps, walk, CRF)", "masks", "cobra-r152-deits-voc", "Refine", "train_aug"),
        Stage("DeepLab training", "seg-train", _SEG, "Decoder"),
        Stage("DeepLab inference (§3.15)", "seg-infer", _SEG, "Decoder", "val"),
    ),
    "cam": (
        Stage("CAM training", "train", "cam-vitb16-voc", "CAM"),
        Stage("seeds + CRF", "seeds", "cam-vitb16-voc", "Refine", "train_aug"),
        Stage("DeepLab training", "seg-train", _SEG, "Decoder"),
        Stage("DeepLab inference (§3.15)", "seg-infer", _SEG, "Decoder", "val"),
    ),
    "seam": (
        Stage("SEAM training", "train", "seam-r50-voc", "CAM"),
        Stage("seeds + CRF", "seeds", "seam-r50-voc", "Refine", "train_aug"),
        Stage("DeepLab training", "seg-train", _SEG, "Decoder"),
        Stage("DeepLab inference (§3.15)", "seg-infer", _SEG, "Decoder", "val"),
    ),
    "sccam": (
        Stage("SC-CAM training (4 rounds, k-means untimed)", "train", "sccam-r50-voc", "CAM"),
        Stage("seeds + CRF", "seeds", "sccam-r50-voc", "Refine", "train_aug"),
        Stage("DeepLab training", "seg-train", _SEG, "Decoder"),
        Stage("DeepLab inference (§3.15)", "seg-infer", _SEG, "Decoder", "val"),
    ),
}
# The CPU-sized stand-ins of the paper configs (tests and smoke runs); projections keep the paper's counts.
TINY = {"seco-vitb16-voc": "seco-tiny-synth", "cobra-r152-deits-voc": "cobra-tiny-synth",
        "cam-vitb16-voc": "cam-tiny-synth", "seam-r50-voc": "seam-tiny-synth", "sccam-r50-voc": "sccam-tiny-synth",
        _SEG: "deeplab-tiny-synth"}  # fmt: skip


def project_minutes(s_per_unit: float, count: int, batch_measured: int | None = None,
                    batch_paper: int | None = None) -> float:  # fmt: skip
    """Minutes for ``count`` steps (or images) at ``s_per_unit`` seconds each; a step measured at a reduced batch
    is scaled linearly to the paper's: ``s/step x batch_paper / batch_measured x iterations / 60``."""
    scale = batch_paper / batch_measured if batch_measured and batch_paper else 1.0
    return s_per_unit * scale * count / 60


def irn_steps(cfg: IRNConfig, images: int = VOC_IMAGES["train_aug"]) -> int:
    """IRN's optimiser steps: ``epochs x floor(images / batch)`` (the loader drops the last batch)."""
    return cfg.epochs * (images // cfg.batch_size)


@dataclass
class BenchOptions:
    """How much to run; see ``wsss bench pipeline --help``."""

    warmup: int = 2  # untimed optimiser steps before the timed ones
    official_warmup: int | None = None  # the official style's own (default: warmup; after ours, on the same model)
    steps: int = 5  # timed steps per training stage (and implementation)
    images: int = 8  # timed images per per-image stage
    warmup_images: int = 1  # untimed images before them
    batch: int | None = None  # training batch (default: the config's); scaled linearly to the paper's
    walk_exp_times: int | None = None  # random-walk squarings run (default: IRN's 8); the rest are projected
    label_batch: int = 8  # the labeler's batch (ours)
    workers: int = 2  # the labeler's decode and CRF processes (ours)
    tiny: bool = False  # CPU-sized configs (TINY); projections keep the paper's counts
    budget_s: float | None = None  # stages not started within this many seconds are recorded as not measured


@dataclass
class Context:
    train: WSSSDataset
    val: WSSSDataset
    device: torch.device
    opts: BenchOptions
    tmp: Path
    cache: dict = dataclasses.field(default_factory=dict)  # (kind, config) -> timings, and trained networks
    start: float = dataclasses.field(default_factory=time.monotonic)

    def config(self, name: str, overrides: tuple[str, ...] = ()) -> dict:
        cfg = get_config(TINY.get(name, name) if self.opts.tiny else name, list(overrides))
        if self.opts.batch:
            cfg["train"]["batch_size"] = self.opts.batch
        cfg["train"]["workers"] = 0
        cfg["pretrained"] = None  # random weights: the timing does not depend on them
        if "pretrained_cnn" in cfg:
            cfg["pretrained_cnn"] = None
        return cfg

    def folder(self, name: str) -> Path:
        """A fresh output folder (the mask stages skip images whose PNG exists)."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- training stages


def time_training(cfg: dict, data: WSSSDataset, device: torch.device, warmup: int, steps: int, official: bool,
                  official_warmup: int | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per ``train_step`` of ``cfg``, ours and (``official``) the loop-transcribed losses, every term on.

    One model serves both: ours gets ``warmup`` untimed steps, the official style then ``official_warmup``
    (default: as many), then their timed steps alternate, so a load change on a shared machine falls on both alike.
    """
    torch.manual_seed(0)
    _, model, objective, optim = build_training(cfg, data.classes, device, verbose=False)
    batches = _batches(training_set(cfg, data, 0), cfg["train"], 0, 0, 1, 0, pin=device.type == "cuda",
                       verbose=False)  # fmt: skip
    amp = cfg["train"]["amp"] and device.type == "cuda"  # as the training loop decides
    step = 100_000  # past every schedule start: every loss term on

    def one(style: str) -> float:
        nonlocal step
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        _sync(device)
        tic = time.perf_counter()
        with official_losses(cfg["method"]) if style == "official" else contextlib.nullcontext():
            train_step(model, objective, optim, batch, step, amp)
        _sync(device)
        step += 1
        return time.perf_counter() - tic

    styles = ["ours", "official"] if official else ["ours"]
    for style in styles:
        for _ in range(warmup if style == "ours" or official_warmup is None else official_warmup):
            one(style)
    times = {style: [] for style in styles}
    for _ in range(steps):
        for style in styles:
            times[style].append(one(style))
    return times


def _train_stage(stage: Stage, ctx: Context) -> dict:
    cfg = ctx.config(stage.config)
    paper = get_config(stage.config)
    if cfg["method"] == "sccam":
        cfg = _sccam_joint_round(cfg, ctx.train)
    official = has_official_losses(cfg["method"])
    times = time_training(cfg, ctx.train, ctx.device, ctx.opts.warmup, ctx.opts.steps, official,
                          ctx.opts.official_warmup)  # fmt: skip
    count = sum(paper["sccam"]["round_iters"]) if "sccam" in paper else paper["train"]["iters"]  # SC-CAM: every round
    return {"units": "steps", "count": count, "batch_measured": cfg["train"]["batch_size"],
            "batch_paper": paper["train"]["batch_size"], "ours": times["ours"], "official": times.get("official"),
            "shared": not official}  # fmt: skip


def _sccam_joint_round(cfg: dict, data: WSSSDataset) -> dict:
    """A joint SC-CAM round (7.10) on random sub-category labels, one sub-class per parent class present: its step
    costs what a real round's does (the rounds' feature extraction and k-means are not timed)."""
    from ..train.sccam_rounds import round_config

    k = cfg["model"]["sub_k"]
    labels = np.stack([data.labels(i) for i in range(len(data))]).astype(np.uint8)
    picks = np.eye(k, dtype=np.uint8)[np.random.default_rng(0).integers(k, size=labels.shape)]
    path = Path(tempfile.mkdtemp(prefix="wsss-sccam-")) / "sub_labels.npz"
    np.savez(path, sub_labels=(picks * labels[..., None]).reshape(len(labels), -1))
    return round_config(cfg, 1, path)


def _irn_config(stage: Stage, ctx: Context) -> IRNConfig:
    """CoBra's IRN (§4.10): the CoBra CNN's trunk at output stride 16, fixed BN, 4 epochs of 32 crops of 512."""
    cfg = ctx.config(stage.config)
    trunk = cobra_irn_trunk(cfg["model"]["cnn"])
    preset = IRNConfig.tiny if ctx.opts.tiny else IRNConfig
    irn = preset(backbone=trunk, num_classes=ctx.train.num_classes, device=str(ctx.device))
    return replace(irn, batch_size=ctx.opts.batch or irn.batch_size, num_workers=ctx.opts.workers)


def _irn_stage(stage: Stage, ctx: Context) -> dict:
    """IRN's steps through ``train_irn`` itself (its per-step log marks the step boundaries); the checkpoint it
    leaves serves the masks stage."""
    cfg = _irn_config(stage, ctx)
    cfg = replace(cfg, max_steps=ctx.opts.warmup + ctx.opts.steps, batch_size=min(cfg.batch_size, len(ctx.train)))
    marks: list[float] = []
    samples = [(ctx.train.image_path(i), ctx.train.mask_path(i)) for i in range(len(ctx.train))]
    path = ctx.folder("irn") / "irn.safetensors"
    start = time.perf_counter()
    train_irn(cfg, samples, path, progress=False, meanshift_images=[samples[0][0]],
              log=lambda step, losses: marks.append(time.perf_counter()))  # fmt: skip
    ctx.cache[("irn", stage.config)] = path
    per_step = np.diff([start, *marks])[ctx.opts.warmup :].tolist()
    paper = IRNConfig()
    return {"units": "steps", "count": irn_steps(paper), "batch_measured": cfg.batch_size,
            "batch_paper": paper.batch_size, "ours": per_step, "official": None, "shared": True}  # fmt: skip


# ---------------------------------------------------------------------------------------------- per-image stages


def _per_image(run: Callable[[WSSSDataset, Path], float], data: WSSSDataset, ctx: Context, name: str) -> list[float]:
    """Seconds per image of ``run(subset, out)`` (which returns its own seconds). After ``warmup_images`` the
    figure is the marginal one, ``(T(n) - T(w)) / (n - w)`` over the first n and w images, so that one-off costs
    (worker processes, allocation) do not count; without them, or when noise makes the difference negative on a
    loaded machine, it is ``T(n) / n``."""
    n, w = min(ctx.opts.images, len(data)), min(ctx.opts.warmup_images, len(data))
    t_w = run(Subset(data, w), ctx.folder(f"{name}-warmup")) if w else 0.0
    t_n = run(Subset(data, n), ctx.folder(name))
    return [(t_n - t_w) / (n - w) if w and n > w and t_n > t_w else t_n / n]


def _network(name: str, ctx: Context, data: WSSSDataset):
    """A random-weight network of the config, in eval mode on the device (cached per config)."""
    key = ("net", name)
    if key not in ctx.cache:
        cfg = ctx.config(name)
        spec = model_spec(cfg, data.classes)
        torch.manual_seed(0)
        ctx.cache[key] = (build_model(spec).to(ctx.device).eval(), spec)
    return ctx.cache[key]


def _timed(fn: Callable[[], object]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def _seeds_stage(stage: Stage, ctx: Context) -> dict:
    """CAM seeds refined by the dense CRF (row C): ``wsss label`` against the research loop (bench label's)."""
    model, spec = _network(stage.config, ctx, ctx.train)
    backend = TorchBackend(model, ctx.device, spec=spec)
    cfg = replace(LabelConfig(spec.cam, "crf"), batch=ctx.opts.label_batch, workers=ctx.opts.workers, quiet=True)

    def ours(subset: WSSSDataset, out: Path) -> float:
        return label_dataset(backend, spec, {}, subset, out, cfg)["elapsed_s"]  # images_per_s is rounded

    def official(subset: WSSSDataset, out: Path) -> float:
        return research_baseline(backend, subset, spec.cam, "crf", out)

    return {"units": "images", "ours": _per_image(ours, ctx.train, ctx, "seeds"),
            "official": _per_image(official, ctx.train, ctx, "seeds-loop"), "shared": False}  # fmt: skip


def _ir_labels_stage(stage: Stage, ctx: Context) -> dict:
    model, spec = _network(stage.config, ctx, ctx.train)

    def run(subset: WSSSDataset, out: Path) -> float:
        return _timed(lambda: write_ir_labels(model, subset, out, spec.cam, progress=False, device=ctx.device))

    return {"units": "images", "ours": _per_image(run, ctx.train, ctx, "ir"), "official": None, "shared": True}


def squaring_seconds(n: int, device: torch.device) -> float:
    """Seconds of one ``T @ T`` of the random walk's dense (n, n) float32 transition matrix (quirk Q6.1)."""
    t = torch.rand(n, n, device=device)
    t @ t  # warm-up (allocation, GEMM heuristics)
    _sync(device)
    return _timed(lambda: (t @ t, _sync(device)))


def _masks_stage(stage: Stage, ctx: Context) -> dict:
    """The random walk and CoBra's mask rule with its CRF (row D). With ``walk_exp_times`` below IRN's 8 the walk
    is shortened and each missing squaring is added at the measured cost of one (the squarings dominate)."""
    irn = ctx.cache.get(("irn", stage.config))
    if irn is None:
        raise ValueError(f"stage {stage.name!r} needs the IRN of its pipeline: put an irn-train stage before it")
    model, spec = _network(stage.config, ctx, ctx.train)
    full = IRNConfig().exp_times
    run_times = full if ctx.opts.walk_exp_times is None else ctx.opts.walk_exp_times

    def run(subset: WSSSDataset, out: Path) -> float:
        return _timed(lambda: write_masks(model, irn, subset, out, spec.cam, exp_times=run_times, progress=False,
                                          device=ctx.device))  # fmt: skip

    measured = _per_image(run, ctx.train, ctx, "masks")
    extra = {"walk_exp_times_run": run_times, "walk_exp_times_paper": full}
    if run_times < full:
        sizes = [ctx.train[i].image.shape[:2] for i in range(min(ctx.opts.images, len(ctx.train)))]
        n = max(((h - 1) // 4 + 1) * ((w - 1) // 4 + 1) for h, w in sizes)
        extra["squaring_s"] = squaring_seconds(n, ctx.device)
        extra["walk_pixels"] = n
        measured = [s + (full - run_times) * extra["squaring_s"] for s in measured]
    return {"units": "images", "ours": measured, "official": None, "shared": True, **extra}


@torch.no_grad()
def official_seg_predict(segment: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, mean, std,
                         size: int = 448, scales=(1.0, 1.25, 1.5), device="cpu") -> np.ndarray:  # fmt: skip
    """§3.15's final prediction the way [SeCo] ``tools/infer_seg_voc.py`` runs it: one image, each scale and its
    flip in turn, logits summed over flips and maxed over scales, softmax, then pydensecrf (row A) in-process."""
    h, w = image.shape[:2]
    x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(mean, device=device)[:, None, None]) / torch.tensor(std, device=device)[:, None, None]
    best = None
    for s in scales:
        side = int(size * s)
        xs = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        logits = 0
        for flipped in (False, True):
            out = segment(xs.flip(-1) if flipped else xs)
            out = out.flip(-1) if flipped else out
            logits = logits + torch.nn.functional.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        best = logits if best is None else torch.maximum(best, logits)
    probs = torch.softmax(best, dim=1)[0].cpu().numpy()
    return crf_from_probs(image, probs, CRF_PRESETS["seg"])


def _seg_infer_stage(stage: Stage, ctx: Context) -> dict:
    """§3.15's final prediction on the val images: ``wsss label --source seg`` (batched, the CRF pooled or on the
    device) against :func:`official_seg_predict` one image at a time."""
    from ..cam.seg import seg_settings  # the segmentation source of the labeler

    model, spec = _network(stage.config, ctx, ctx.val)
    backend = TorchBackend(model, ctx.device, spec=spec, what="seg")
    settings = seg_settings(spec.cam)
    cfg = replace(LabelConfig(settings, "crf"), batch=ctx.opts.label_batch, workers=ctx.opts.workers, quiet=True,
                  source="seg")  # fmt: skip

    def ours(subset: WSSSDataset, out: Path) -> float:
        return label_dataset(backend, spec, {}, subset, out, cfg)["elapsed_s"]  # images_per_s is rounded

    def official(subset: WSSSDataset, out: Path) -> float:
        def run() -> None:
            for i in range(len(subset)):
                sample = subset[i]
                label = official_seg_predict(model.segment, sample.image, spec.mean, spec.std, settings.input_size,
                                             settings.scales, ctx.device)  # fmt: skip
                save_label_png(out / f"{sample.id}.png", label.astype(np.uint8))

        return _timed(run)

    return {"units": "images", "ours": _per_image(ours, ctx.val, ctx, "seg"),
            "official": _per_image(official, ctx.val, ctx, "seg-loop"), "shared": False}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the bench

RUNNERS: dict[str, Callable[[Stage, Context], dict]] = {
    "train": _train_stage,
    "irn-train": _irn_stage,
    "seeds": _seeds_stage,
    "ir-labels": _ir_labels_stage,
    "masks": _masks_stage,
    "seg-train": _train_stage,  # a training step of the segmentation config (the shared loop)
    "seg-infer": _seg_infer_stage,
}


def stage_minutes(row: dict, style: str) -> float:
    """A measured stage row's projected minutes for ``style`` (ours / official; a shared stage has one figure)."""
    samples = row[style] if row.get(style) is not None else row["ours"]
    return project_minutes(float(np.mean(samples)), row["count"], row.get("batch_measured"), row.get("batch_paper"))


def run_stage(stage: Stage, ctx: Context) -> dict:
    """One stage, timed (or, when another pipeline or ``previous`` measured the same stage of the same config,
    reused). A stage that cannot run here (a missing config or package) is recorded with its error."""
    key = (stage.kind, stage.config)
    row = {"stage": stage.name, "kind": stage.kind, "config": stage.config, "column": stage.column}
    if key not in ctx.cache:
        try:
            if stage.kind not in RUNNERS:
                raise ValueError(f"stage kind {stage.kind!r} has no timer (known: {', '.join(RUNNERS)})")
            if ctx.opts.budget_s is not None and time.monotonic() - ctx.start > ctx.opts.budget_s:
                raise RuntimeError(f"time budget spent ({ctx.opts.budget_s:.0f} s)")
            measured_with = {k: getattr(ctx.opts, k) for k in ("warmup", "official_warmup", "steps", "images",
                                                               "warmup_images", "batch", "walk_exp_times")}  # fmt: skip
            load = os.getloadavg()[0]  # the machine may be shared: the load it was measured under
            timing = RUNNERS[stage.kind](stage, ctx)
            measured_with["load_avg_1min"] = [round(load, 1), round(os.getloadavg()[0], 1)]
            ctx.cache[key] = {**timing, "measured_with": measured_with}
        except (ValueError, KeyError, RuntimeError, ImportError) as err:
            return {**row, "error": f"{type(err).__name__}: {err}"}
    row.update(ctx.cache[key])
    if stage.per_image:
        row.update(count=VOC_IMAGES[stage.images], images_split=stage.images)
    row["minutes"] = {style: stage_minutes(row, style) for style in ("ours", "official")}
    row["ratio"] = row["minutes"]["official"] / row["minutes"]["ours"]
    return row


def measured_stages(previous: dict) -> dict[tuple[str, str], dict]:
    """The timings of a previous result's measured stages, by (kind, config), to reuse instead of re-timing."""
    keep = ("units", "count", "batch_measured", "batch_paper", "ours", "official", "shared", "walk_exp_times_run",
            "walk_exp_times_paper", "squaring_s", "walk_pixels")  # fmt: skip
    cache = {}
    for summary in previous["methods"].values():
        for r in summary["stages"]:
            if "error" not in r:
                cache[(r["kind"], r["config"])] = {**{k: r[k] for k in keep if k in r},
                                                   "measured_with": r.get("measured_with", previous["options"]),
                                                   "reused": r.get("reused", previous["time"])}  # fmt: skip
    return cache


def bench_pipeline(train: WSSSDataset, val: WSSSDataset, methods: list[str], device: str = "cpu",
                   opts: BenchOptions | None = None, progress: Callable[[str], None] | None = None,
                   previous: dict | None = None, checkpoint: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Every stage of each method's pipeline, timed ours and official-style, projected to the paper's schedule.

    ``previous`` (an earlier result on the same device) supplies the stages it measured; the rest are timed.
    ``checkpoint(result so far)`` is called after every stage (an interrupted run leaves what it measured)."""
    unknown = [m for m in methods if m not in PIPELINES]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(PIPELINES)}")
    opts = opts or BenchOptions()
    dev = select_device(device)
    if previous is not None and previous["device"].get("gpu") != device_info(device).get("gpu"):  # same machine
        raise ValueError(f"the previous result ran on {previous['device'].get('gpu') or 'a CPU'}, not on {device}")
    info = device_info(device)
    result = {"mode": "reduced steps on CPU" if dev.type == "cpu" else f"measured on {info['gpu']}",
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "options": dataclasses.asdict(opts),
              "train_images": len(train), "val_images": len(val), "image_counts": VOC_IMAGES, "table4": TABLE4,
              "seco_log": SECO_LOG, "device": info, "methods": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="wsss-bench-pipeline-") as tmp:
        ctx = Context(train, val, dev, opts, Path(tmp), measured_stages(previous) if previous else {})
        for method in methods:
            rows = []
            for stage in PIPELINES[method]:
                tic = time.perf_counter()
                rows.append(run_stage(stage, ctx))
                if progress:
                    r = rows[-1]
                    what = (f"error: {r['error']}" if "error" in r else f"ours {r['minutes']['ours']:10.1f} min, "
                            f"official {r['minutes']['official']:10.1f} min")  # fmt: skip
                    progress(f"{method:6s} {stage.name:28s} {what} ({time.perf_counter() - tic:.0f} s)")
                if checkpoint:
                    checkpoint({**result, "methods": {**result["methods"], method: summarise(rows)}})
            result["methods"][method] = summarise(rows)
    return result


def summarise(rows: list[dict]) -> dict:
    """Stage rows with totals per Table 4 column and per implementation, and the official/ours ratio; ``complete``
    is false when a stage could not run (its minutes are then missing from the totals)."""
    done = [r for r in rows if "error" not in r]
    totals = {style: sum(r["minutes"][style] for r in done) for style in ("ours", "official")}
    columns = {style: {c: sum(r["minutes"][style] for r in done if r["column"] == c) for c in COLUMNS}
               for style in ("ours", "official")}  # fmt: skip
    ratio = totals["official"] / totals["ours"] if totals["ours"] else None
    return {"stages": rows, "minutes": totals, "columns": columns, "ratio": ratio, "complete": len(done) == len(rows)}


# ------------------------------------------------------------------------------------------------------- reporting


def table_lines(result: dict) -> list[str]:
    """The result as text: minutes per stage (ours, official style, ratio), then Table 4 and SeCo's log."""
    lines = [f"wsss bench pipeline, {result['mode']} ({_device_name(result)}); minutes projected to the paper's "
             f"schedule and VOC image counts"]  # fmt: skip
    lines.append(f"{'method':7s} {'stage':30s} {'column':8s} {'measured':>14s} {'x count':>8s} {'ours min':>10s} "
                 f"{'official':>10s} {'ratio':>6s}  load")  # fmt: skip
    for method, summary in result["methods"].items():
        for r in summary["stages"]:
            if "error" in r:
                lines.append(f"{method:7s} {r['stage']:30s} {r['column']:8s} not measured: {r['error']}")
                continue
            unit = "s/step" if r["units"] == "steps" else "s/img"
            measured = f"{np.mean(r['ours']):.3g} {unit}"
            ratio = "shared" if r["shared"] else f"{r['ratio']:.2f}x"
            load = "-".join(f"{x:g}" for x in r.get("measured_with", {}).get("load_avg_1min", []))
            minutes = f"{r['minutes']['ours']:10.1f} {r['minutes']['official']:10.1f}"
            lines.append(f"{method:7s} {r['stage']:30s} {r['column']:8s} {measured:>14s} {r['count']:8d} {minutes} "
                         f"{ratio:>6s}  {load}")  # fmt: skip
        m, ratio = summary["minutes"], summary["ratio"]
        total = "total" if summary["complete"] else "total (incomplete)"
        lines.append(f"{method:7s} {total:30s} {'':8s} {'':>14s} {'':>8s} {m['ours']:10.1f} {m['official']:10.1f} "
                     f"{ratio or 0:5.2f}x")  # fmt: skip
    lines.append(f"Table 4 ({TABLE4['device']}, {TABLE4['source']}):")
    for name, row in TABLE4["rows"].items():
        lines.append(f"  {name:6s} " + ", ".join(f"{k} {v} min" for k, v in row.items()))
    log = SECO_LOG
    lines.append(
        f"SeCo's log: {log['s_per_iter']} s/iteration x {log['iterations']} = "
        f"{project_minutes(log['s_per_iter'], log['iterations']):.0f} min of training ({log['source']})"
    )
    return lines


def _device_name(result: dict) -> str:
    info = result["device"]
    return info.get("gpu") or f"{info['cpu']} CPU, {info['cpu_count']} cores, {info['torch_threads']} threads"


def plot_pipeline(result: dict, path: Path) -> Path:
    """Stacked minutes per stage, one bar per method and implementation, beside Table 4's bars (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ref) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    bars = [(m, style) for m in result["methods"] for style in ("ours", "official")]
    names = sorted({r["stage"] for s in result["methods"].values() for r in s["stages"] if "error" not in r})
    colours = dict(zip(names, plt.cm.tab20(np.linspace(0, 1, max(len(names), 2))), strict=False))
    for x, (method, style) in enumerate(bars):
        bottom = 0.0
        for r in result["methods"][method]["stages"]:
            if "error" in r:
                continue
            value = r["minutes"][style]
            ax.bar(x, value, bottom=bottom, color=colours[r["stage"]], edgecolor="white",
                   hatch="//" if style == "official" and not r["shared"] else None)  # fmt: skip
            bottom += value
    ax.set_xticks(range(len(bars)), [f"{m}\n{'wsss' if s == 'ours' else 'official style'}" for m, s in bars])
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in names]
    ax.legend(handles, names, fontsize=7, loc="upper left")
    ax.set_ylabel("minutes (projected to the paper's schedule)")
    suffix = "reduced steps on CPU" if result["mode"].startswith("reduced") else result["mode"]
    ax.set_title(f"wsss bench pipeline: {suffix}\n{_device_name(result)}", fontsize=9)
    rows = TABLE4["rows"]
    for x, row in enumerate(rows.values()):
        bottom = 0.0
        for part, value in row.items():
            ref.bar(x, value, bottom=bottom, color="0.75" if part != "Decoder" else "0.55", edgecolor="white")
            bottom += value
    ref.set_xticks(range(len(rows)), list(rows))
    ref.set_title(f"SeCo's Table 4 ({TABLE4['device']})", fontsize=9)
    ref.set_ylabel("minutes")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
