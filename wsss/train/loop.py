"""The training loop shared by every method: data, schedule, AMP, torchrun, resume, JSONL metrics, checkpoints.

Under torchrun every rank holds the same model and objective state, step after step:

* model and objective are built from the same seed; after construction (or resume) rank 0's objective state is
  broadcast, and DDP broadcasts the model's;
* DDP averages the model's gradients and ``_average_gradients`` those of the objective's own heads (SeCo's phi), so
  every rank applies the same update, and the EMA teachers follow identical students;
* banks and queues are updated from inputs all-gathered in rank order (``wsss.train.seco._gather``);
* BatchNorm running statistics (CoBra's CNN when not frozen) are rank 0's: DDP broadcasts them before every
  forward, ``_sync_buffers`` before validation and at the end;
* only the random streams differ: dropout per (seed, rank, step), the data by rank shard. Validation is sharded
  too, its confusion matrices summed over the ranks.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..cam.pipeline import image_pyramid, predict_cams
from ..data.datasets import WSSSDataset
from ..data.transforms import AugmentConfig, augment, seco_views, to_tensor
from ..eval.metrics import ConfusionMatrix
from ..models import ModelSpec, build_model, load_pretrained, load_state_into, save_model
from .cam import CAMObjective, MaskedCAMObjective
from .cobra import CoBraObjective
from .configs import model_spec
from .optim import make_optimizer, param_groups
from .sccam import SCCAMObjective
from .seam import SEAMObjective
from .seco import SeCoObjective
from .seg import SegObjective, seg_training_set

CHECKPOINT = "last.safetensors"
RESUME_STATE = "last.state.pt"


class TrainSet(Dataset):
    """Augmented training views with image-level tags and the valid-pixel box (§3.3, §1.6)."""

    def __init__(
        self, data: WSSSDataset, aug: AugmentConfig, seed: int, cache: bool, progress: bool = False,
        seco_views: bool = False, s_flip: float = 0.5,
    ):  # fmt: skip
        missing = [data.ids[i] for i in range(len(data)) if data.labels(i) is None]
        if missing:
            raise ValueError(f"{len(missing)} training images have no image-level labels, e.g. {missing[:3]}")
        self.data, self.aug, self.seed = data, aug, seed
        self.seco_views, self.s_flip = seco_views, s_flip
        indices = tqdm(range(len(data)), desc="cache images", leave=False, disable=not progress)
        self.cache = [data[i].image for i in indices] if cache else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        """``key`` = (epoch, image index): the view depends on nothing else (resume sees the same batches)."""
        epoch, i = key
        img = self.cache[i] if self.cache is not None else self.data[i].image
        rng = np.random.default_rng([self.seed, epoch, i])
        crop, box = augment(img, self.aug, rng)
        labels = self.data.labels(i)
        item = {"image": to_tensor(crop), "labels": torch.from_numpy(labels), "img_box": box}
        item["index"] = i  # SC-CAM looks up the image's sub-category labels (wsss.train.sccam)
        if self.seco_views:  # SeCo's weak and strong views, and the class of single-class images (§3.3)
            weak, strong = seco_views(img, crop, self.aug.crop, rng, self.s_flip)
            item.update(weak=to_tensor(weak), strong=to_tensor(strong),
                        label_idx=int(np.flatnonzero(labels)[0] + 1) if labels.sum() == 1 else -1)  # fmt: skip
        return item


OBJECTIVES = {
    "cam": CAMObjective,
    "seco": SeCoObjective,
    "cobra": CoBraObjective,
    "seam": SEAMObjective,
    "sccam": SCCAMObjective,
    "segnet": SegObjective,
}


def objective_class(cfg: dict[str, Any]) -> type[nn.Module]:
    """The method's objective; a CAM config with ``"supervision": "masks"`` pre-trains on masks instead."""
    return MaskedCAMObjective if mask_supervised(cfg) else OBJECTIVES[cfg["method"]]


def mask_supervised(cfg: dict[str, Any]) -> bool:
    return cfg["method"] == "cam" and cfg.get("supervision", "tags") == "masks"


def resolve_device(requested: str | None, local_rank: int | None, cuda_devices: int, current: int = 0) -> torch.device:
    """The training device. Under torchrun (``local_rank`` given) a CUDA rank uses ``cuda:LOCAL_RANK``; otherwise
    ``requested`` (default: CUDA when there is one), a bare ``cuda`` meaning the ``current`` device."""
    device = torch.device(requested or ("cuda" if cuda_devices else "cpu"))
    if device.type != "cuda":
        return device
    if not cuda_devices:
        raise ValueError(f"--device {requested}: no CUDA device is visible (use --device cpu)")
    if local_rank is not None:
        if device.index not in (None, local_rank):
            raise ValueError(f"--device {requested} under torchrun: each rank trains on cuda:LOCAL_RANK "
                             f"(here cuda:{local_rank}); pass --device cuda or leave it out")  # fmt: skip
        return torch.device("cuda", local_rank)
    index = current if device.index is None else device.index
    if index >= cuda_devices:
        raise ValueError(f"--device {requested}: only {cuda_devices} CUDA device(s) are visible")
    return torch.device("cuda", index)


def select_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """``resolve_device`` on this machine, the chosen GPU made current (Triton launches on the current device)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = resolve_device(requested, local_rank, cuda, torch.cuda.current_device() if cuda else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _setup(requested: str | None) -> tuple[torch.device, int, int]:
    """(device, rank, world size): under torchrun the process group is started (NCCL on CUDA, else gloo) on the
    rank's GPU ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) if world > 1 else None
    device = select_device(requested, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, (dist.get_rank() if world > 1 else 0), world


def _seed_step(seed: int, rank: int, step: int) -> None:
    """Seed the global CPU and CUDA generators (dropout, drop-path) from (seed, rank, step): each rank draws its
    own stream, and a resumed run draws what the uninterrupted one drew, whatever the device."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def build_training(cfg: dict[str, Any], classes: tuple[str, ...], device: torch.device, weights: dict | None = None,
                   verbose: bool = True):  # fmt: skip
    """(spec, model, objective, optimizer) of a config, on ``device``. ``weights`` maps a part ("backbone", "cnn")
    to the file it starts from. The global RNG must be seeded alike on every rank before this call."""
    spec = model_spec(cfg, classes)
    model = build_model(spec)
    for part, path in (weights or {}).items():
        if path:
            report = load_pretrained(model, path, part).check(allow_missing=part == "backbone",
                                                              allow_unexpected=True)  # fmt: skip
            if verbose:
                tqdm.write(f"pretrained {part}: {report}")
    model.to(device)
    objective = objective_class(cfg)(model, cfg).to(device)  # training-only parts (teachers, banks)
    backbone, heads = model.param_groups()
    ocfg = cfg["optim"]
    groups = param_groups(backbone, heads + objective.trainable(), ocfg["lr"], ocfg["head_lr"])
    return spec, model, objective, make_optimizer(groups, ocfg, cfg["train"]["iters"])


def train_step(net: nn.Module, objective: nn.Module, optim: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               step: int, amp: bool, world: int = 1) -> dict[str, torch.Tensor]:  # fmt: skip
    """One optimiser step: the objective under bf16 autocast when ``amp`` (each objective keeps what it thresholds
    in float32), backward, the objective's own heads' gradients averaged over ranks (they sit outside DDP)."""
    with torch.autocast(batch["image"].device.type, dtype=torch.bfloat16, enabled=amp):
        losses = objective(net, batch, step)
    optim.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if world > 1:
        _average_gradients(objective.trainable(), world)
    optim.step()
    return losses


def train(
    cfg: dict[str, Any],
    data: WSSSDataset,
    out: str | Path,
    val: WSSSDataset | None = None,
    pretrained: str | None = None,
    resume: bool = False,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    max_steps: int | None = None,
) -> Path:
    """Train ``cfg['method']`` on ``data``; leaves ``out/last.safetensors`` and returns its path.

    Interrupting (Ctrl-C, SIGTERM) saves a checkpoint first; ``resume=True`` continues from it and reproduces
    the uninterrupted run. ``max_steps`` stops early (at that global step) without changing the LR schedule.
    Under torchrun every rank holds the same model and objective state (module docstring).
    """
    out = Path(out)
    device, rank, world = _setup(device)
    tcfg = cfg["train"]
    resume = resume and (out / CHECKPOINT).is_file()  # --resume on a fresh folder simply starts
    weights = {} if resume else {"backbone": pretrained or cfg.get("pretrained"), "cnn": cfg.get("pretrained_cnn")}
    torch.manual_seed(seed)  # the same initial model and objective on every rank
    spec, model, objective, optim = build_training(cfg, data.classes, device, weights, verbose=rank == 0)
    step = _resume(out, model, optim, objective, device) if resume else 0
    if world > 1:  # DDP broadcasts the model; the objective's teachers, bank and queue follow rank 0 as well
        _broadcast([*objective.parameters(), *objective.buffers()])
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if device.type == "cuda" and cfg["method"] in ("cobra", "segnet"):
        torch.backends.cudnn.benchmark = True  # fixed-size crops: cuDNN times its convolutions once

    batches = _batches(training_set(cfg, data, seed, progress and rank == 0), tcfg, seed, rank, world, step,
                       pin=device.type == "cuda", verbose=rank == 0)  # fmt: skip
    amp = tcfg["amp"] and device.type == "cuda"
    meta = {"config_name": cfg.get("name"), "config": cfg, "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("a") if rank == 0 else None

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    bar = tqdm(total=tcfg["iters"], initial=step, desc=f"train {cfg.get('name', cfg['method'])}",
               disable=not progress or rank != 0, dynamic_ncols=True)  # fmt: skip
    running, saved, t0 = None, step, time.perf_counter()
    try:
        while step < min(tcfg["iters"], max_steps or tcfg["iters"]) and stop["signal"] is None:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            net.train()
            _seed_step(seed, rank, step)
            losses = train_step(net, objective, optim, batch, step, amp, world)
            step += 1
            detached = {k: v.detach().float() for k, v in losses.items()}
            running = detached if running is None else {k: running[k] + v for k, v in detached.items()}
            bar.update(1)
            if step % tcfg["log_every"] == 0 or step == tcfg["iters"]:
                _log(log, bar, step, running, tcfg["log_every"], optim, t0)
                running = None
            if val is not None and tcfg["eval_every"] and step % tcfg["eval_every"] == 0:
                _sync_buffers(model, world)
                _write(log, {"step": step, **validate(model, val, spec, device, tcfg["eval_images"], rank, world)})
            if rank == 0 and step % tcfg["ckpt_every"] == 0:
                saved = _save(out, model, spec, optim, objective, meta, step)
    except KeyboardInterrupt:
        stop["signal"] = signal.SIGINT
    finally:  # whatever ended the loop, the last finished step is kept
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        if rank == 0 and step > saved:
            _save(out, model, spec, optim, objective, meta, step)
        if log:
            log.close()
    if stop["signal"] is not None:
        raise KeyboardInterrupt(f"training interrupted at step {step}; checkpoint saved, rerun with --resume")
    _sync_buffers(model, world)  # every rank ends with the BatchNorm statistics of the saved model
    return out / CHECKPOINT


def _broadcast(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        dist.broadcast(t.data, 0)


def _sync_buffers(model: nn.Module, world: int) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP's next forward would make them."""
    if world > 1:
        _broadcast(list(model.buffers()))


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, src in zip(grads, torch.split(flat / world, [g.numel() for g in grads]), strict=True):
            g.copy_(src.view_as(g))


def training_set(cfg: dict[str, Any], data: WSSSDataset, seed: int, progress: bool = False) -> TrainSet:
    """The config's augmented training views of ``data``."""
    if cfg["method"] == "segnet" or mask_supervised(cfg):  # images with their (pseudo-)masks
        return seg_training_set(cfg, data, seed, progress)
    d = cfg["data"]
    aug = AugmentConfig(d["crop"], tuple(d["scale_range"]), d["flip"], d["jitter"])
    return TrainSet(data, aug, seed, d.get("cache_images", False), progress, seco_views=cfg["method"] == "seco",
                    s_flip=cfg.get("seco", {}).get("s_flip", 0.5))  # fmt: skip


def loader_workers(requested: int, verbose: bool = True) -> int:
    """``train.workers`` capped at the CPU cores this process may use, shared by the ranks of this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if requested > per_rank and verbose:
        tqdm.write(f"train.workers={requested} capped at {per_rank}: the CPU cores available per rank")
    return min(requested, per_rank)


def _batches(trainset: TrainSet, tcfg: dict, seed: int, rank: int, world: int, start: int, pin: bool = False,
             verbose: bool = True):  # fmt: skip
    """Endless shuffled batches from step ``start`` on; each rank reads its own slice of every epoch's order.

    Orders and augmentations depend only on (seed, epoch, index), so a resumed run sees the batches an
    uninterrupted one would have seen. One loader serves every epoch, so its workers live as long as the run.
    """
    size = tcfg["batch_size"]
    per_epoch = len(trainset) // world // size
    if per_epoch == 0:
        raise ValueError(f"{len(trainset)} training images are fewer than one batch of {size} x {world} ranks")

    def keys():
        epoch, skip = divmod(start, per_epoch)
        while True:
            order = torch.randperm(len(trainset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            yield from ((epoch, i) for i in order[rank::world][skip * size : per_epoch * size].tolist())
            epoch, skip = epoch + 1, 0

    # its own generator: creating the iterator must not draw from the global RNG
    loader = DataLoader(trainset, batch_size=size, sampler=keys(), num_workers=loader_workers(tcfg["workers"], verbose),
                        pin_memory=pin, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return iter(loader)


def _log(log, bar, step: int, running: dict, every: int, optim, t0: float) -> None:
    """Average the on-device loss sums (the only host sync, once per ``every`` steps) and write them."""
    n = step % every or every
    record = {"step": step, **{k: round(float(v) / n, 5) + 0.0 for k, v in running.items()}}  # + 0.0: no "-0.0"
    record["lr"] = optim.param_groups[0]["lr"]
    record["elapsed_s"] = round(time.perf_counter() - t0, 2)
    bar.set_postfix(loss=f"{record['loss']:.4f}")
    _write(log, record)


def _write(log, record: dict) -> None:
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()


def _save(out: Path, model: nn.Module, spec: ModelSpec, optim: torch.optim.Optimizer, objective: nn.Module,
          meta: dict, step: int):  # fmt: skip
    save_model(out / CHECKPOINT, model, spec, **meta, step=step)
    state = {"optimizer": optim.state_dict(), "step": torch.tensor(step), "objective": objective.state_dict()}
    tmp = out / (RESUME_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / RESUME_STATE)
    return step


def _resume(out: Path, model: nn.Module, optim: torch.optim.Optimizer, objective: nn.Module, device) -> int:
    """Model, optimiser and objective state of ``out``; the random streams need none (``_seed_step``)."""
    meta, _ = load_state_into(model, out / CHECKPOINT)
    state = torch.load(out / RESUME_STATE, map_location=device, weights_only=True)
    optim.load_state_dict(state["optimizer"])
    objective.load_state_dict(state["objective"])
    optim.global_step = int(state["step"])
    if int(state["step"]) != meta["step"]:
        raise ValueError(f"{out}: checkpoint step {meta['step']} != optimizer state step {int(state['step'])}")
    return int(state["step"])


class _AuxCAM(nn.Module):
    """A SeCo student seen through its auxiliary classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.patch_size = model, model.patch_size

    def forward(self, x):
        return self.model.aux_outputs(x)


@torch.no_grad()
def validate(model: nn.Module, val: WSSSDataset, spec: ModelSpec, device, max_images: int, rank: int = 0,
             world: int = 1) -> dict[str, float]:  # fmt: skip
    """SeCo's validation columns (§3.15) on up to ``max_images`` images: "CAM" seeds, and for SeCo students
    "aux_CAM" seeds and "Seg_Pred" (single-scale arg-max of the decoder at the CAM input size).

    With ``world`` ranks each validates every ``world``-th image and the confusion matrices are summed (every rank
    gets the result)."""
    settings = spec.cam
    model.eval()
    views = {"val_seed_miou": model} if spec.family != "segnet" else {}  # a segmentation network has no CAMs
    if hasattr(model, "aux_outputs"):
        views["val_aux_seed_miou"] = _AuxCAM(model)
    matrices = {name: ConfusionMatrix(val.num_classes) for name in views}
    if hasattr(model, "segment"):
        matrices["val_seg_miou"] = ConfusionMatrix(val.num_classes)
    shard = range(rank, min(len(val), max_images), world)
    for start in range(0, len(shard), 16):
        samples = [val[i] for i in shard[start : start + 16]]
        for name, net in views.items():
            results = predict_cams(net, [s.image for s in samples], [s.labels for s in samples], settings, device,
                                   spec.mean, spec.std)  # fmt: skip
            for s, r in zip(samples, results, strict=True):
                matrices[name].update(r.seed, s.mask)
        if "val_seg_miou" in matrices:
            x = image_pyramid([s.image for s in samples], settings.replace(scales=(1.0,)), device, spec.mean,
                              spec.std)[0]  # fmt: skip
            seg = model.segment(x)
            for i, s in enumerate(samples):
                up = F.interpolate(seg[i : i + 1], size=s.mask.shape, mode="bilinear", align_corners=False)
                matrices["val_seg_miou"].update(up.argmax(1)[0].cpu(), torch.from_numpy(s.mask))
    if world > 1:  # the matrices (numpy or CPU tensors) travel pickled
        shards: list[dict[str, ConfusionMatrix]] = [{} for _ in range(world)]
        dist.all_gather_object(shards, matrices)
        matrices = {name: functools.reduce(operator.add, (m[name] for m in shards)) for name in matrices}
    return {name: round(cm.compute()["miou"], 5) for name, cm in matrices.items()}
