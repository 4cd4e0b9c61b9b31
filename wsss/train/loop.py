"""The training loop shared by every method: data, schedule, AMP, torchrun, resume, JSONL metrics, checkpoints."""

from __future__ import annotations

import json
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
from .cam import CAMObjective
from .cobra import CoBraObjective
from .configs import model_spec
from .optim import make_optimizer, param_groups
from .seco import SeCoObjective

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
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.cache[i] if self.cache is not None else self.data[i].image
        rng = np.random.default_rng([self.seed, self.epoch, i])
        crop, box = augment(img, self.aug, rng)
        labels = self.data.labels(i)
        item = {"image": to_tensor(crop), "labels": torch.from_numpy(labels), "img_box": box}
        if self.seco_views:  # SeCo's weak and strong views, and the class of single-class images (§3.3)
            weak, strong = seco_views(img, crop, self.aug.crop, rng, self.s_flip)
            item.update(weak=to_tensor(weak), strong=to_tensor(strong),
                        label_idx=int(np.flatnonzero(labels)[0] + 1) if labels.sum() == 1 else -1)  # fmt: skip
        return item


OBJECTIVES = {"cam": CAMObjective, "seco": SeCoObjective, "cobra": CoBraObjective}


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


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
    """
    out = Path(out)
    rank, world = _distributed()
    if world > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed + rank)
    tcfg, ocfg = cfg["train"], cfg["optim"]

    spec = model_spec(cfg, data.classes)
    model = build_model(spec)
    resume = resume and (out / CHECKPOINT).is_file()  # --resume on a fresh folder simply starts
    for part, key, given in (("backbone", "pretrained", pretrained), ("cnn", "pretrained_cnn", None)):
        weights = given or cfg.get(key)
        if weights and not resume:
            report = load_pretrained(model, weights, part).check(allow_missing=part == "backbone",
                                                                 allow_unexpected=True)  # fmt: skip
            if rank == 0:
                tqdm.write(f"pretrained {part}: {report}")
    model.to(device)
    objective = OBJECTIVES[cfg["method"]](model, cfg).to(device)  # training-only parts (teachers, banks)
    backbone, heads = model.param_groups()
    groups = param_groups(backbone, heads + objective.trainable(), ocfg["lr"], ocfg["head_lr"])
    optim = make_optimizer(groups, ocfg, tcfg["iters"])
    step = _resume(out, model, optim, objective, device) if resume else 0
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    dcfg = cfg["data"]
    aug = AugmentConfig(dcfg["crop"], tuple(dcfg["scale_range"]), dcfg["flip"], dcfg["jitter"])
    trainset = TrainSet(data, aug, seed, dcfg.get("cache_images", False), progress and rank == 0,
                        seco_views=cfg["method"] == "seco", s_flip=cfg.get("seco", {}).get("s_flip", 0.5))  # fmt: skip
    batches = _batches(trainset, tcfg, seed, rank, world, step)
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
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                losses = objective(net, batch, step)
            optim.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if world > 1:  # the objective's own trainable heads sit outside DDP
                _average_gradients(objective.trainable(), world)
            optim.step()
            step += 1
            detached = {k: v.detach().float() for k, v in losses.items()}
            running = detached if running is None else {k: running[k] + v for k, v in detached.items()}
            bar.update(1)
            if step % tcfg["log_every"] == 0 or step == tcfg["iters"]:
                _log(log, bar, step, running, tcfg["log_every"], optim, t0)
                running = None
            if rank == 0 and val is not None and tcfg["eval_every"] and step % tcfg["eval_every"] == 0:
                _write(log, {"step": step, **validate(model, val, spec, device, tcfg["eval_images"])})
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
    return out / CHECKPOINT


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, src in zip(grads, torch.split(flat / world, [g.numel() for g in grads]), strict=True):
            g.copy_(src.view_as(g))


def _batches(trainset: TrainSet, tcfg: dict, seed: int, rank: int, world: int, start: int):
    """Endless shuffled batches from step ``start`` on; each rank reads its own slice of every epoch's order.

    Orders and augmentations depend only on (seed, epoch, index), so a resumed run sees the batches an
    uninterrupted one would have seen.
    """
    size = tcfg["batch_size"]
    per_epoch = len(trainset) // world // size
    if per_epoch == 0:
        raise ValueError(f"{len(trainset)} training images are fewer than one batch of {size} x {world} ranks")
    epoch, skip = divmod(start, per_epoch)
    while True:
        trainset.epoch = epoch
        order = torch.randperm(len(trainset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        indices = order[rank::world][skip * size : per_epoch * size].tolist()
        # its own generator: creating an iterator must not draw from the global RNG (resume would diverge)
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        yield from DataLoader(trainset, batch_size=size, sampler=indices, num_workers=tcfg["workers"],
                              generator=generator)  # fmt: skip
        epoch, skip = epoch + 1, 0


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
    state = {"optimizer": optim.state_dict(), "step": torch.tensor(step), "rng": torch.get_rng_state(),
             "objective": objective.state_dict()}  # fmt: skip
    tmp = out / (RESUME_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / RESUME_STATE)
    return step


def _resume(out: Path, model: nn.Module, optim: torch.optim.Optimizer, objective: nn.Module, device) -> int:
    meta, _ = load_state_into(model, out / CHECKPOINT)
    state = torch.load(out / RESUME_STATE, map_location=device, weights_only=True)
    optim.load_state_dict(state["optimizer"])
    objective.load_state_dict(state["objective"])
    optim.global_step = int(state["step"])
    torch.set_rng_state(state["rng"])
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
def validate(model: nn.Module, val: WSSSDataset, spec: ModelSpec, device, max_images: int) -> dict[str, float]:
    """SeCo's validation columns (§3.15) on up to ``max_images`` images: "CAM" seeds, and for SeCo students
    "aux_CAM" seeds and "Seg_Pred" (single-scale arg-max of the decoder at the CAM input size)."""
    settings = spec.cam
    model.eval()
    views = {"val_seed_miou": model}
    if hasattr(model, "aux_outputs"):
        views["val_aux_seed_miou"] = _AuxCAM(model)
    matrices = {name: ConfusionMatrix(val.num_classes) for name in views}
    if hasattr(model, "segment"):
        matrices["val_seg_miou"] = ConfusionMatrix(val.num_classes)
    for start in range(0, min(len(val), max_images), 16):
        samples = [val[i] for i in range(start, min(start + 16, len(val), max_images))]
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
    return {name: round(cm.compute()["miou"], 5) for name, cm in matrices.items()}
