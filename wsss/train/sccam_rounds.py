"""SC-CAM's rounds as one resumable run (§7.2, Algorithm 1 of the paper).

Round 0 trains the plain parent classifier (the official starting model, ``from_round_nb = 0``). Each round
``r = 1..rounds`` extracts features with round ``r-1``'s checkpoint, clusters them per class (7.9), writes the
pseudo sub-category labels, and trains a **new** network from the starting weights on (7.10). Layout::

    OUT/round0/last.safetensors             the plain classifier
    OUT/roundR/sub_labels.npz               round R's labels (from round R-1's features)
    OUT/roundR/last.safetensors, ...         round R's network and its resume state
    OUT/last.safetensors                    a copy of the final round's checkpoint

A round is finished when its checkpoint holds ``train.iters`` steps. ``resume=True`` skips finished rounds and
existing label files and continues the unfinished round from its own checkpoint, so an interrupted run ends
where the uninterrupted one does.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from ..data.datasets import WSSSDataset
from ..models import load_model
from .loop import CHECKPOINT, select_device, train
from .sccam import SCCAM_DEFAULTS, cluster_sub_labels, extract_features, save_sub_labels

LABELS = "sub_labels.npz"
RESUME_KEYS = ("model", "data", "optim", "train", "pretrained")  # what a resumed round must share with its config


def round_config(cfg: dict[str, Any], r: int, labels: Path | None) -> dict[str, Any]:
    """Round ``r``'s config: round 0 without a sub-category head, later rounds with ``sub_k`` and their labels."""
    out = copy.deepcopy(cfg)
    sc = {**SCCAM_DEFAULTS, **cfg.get("sccam", {})}
    if r == 0:
        out["model"]["sub_k"] = 0
    out["sccam"] = {**sc, "sub_labels": str(labels) if labels else None}
    return out


def round_stop(cfg: dict[str, Any], r: int) -> int:
    """The step round ``r`` ends at: ``sccam.round_iters[r]`` (the official script keeps earlier epochs of one
    poly schedule), else ``train.iters``."""
    stops = cfg.get("sccam", {}).get("round_iters")
    return int(stops[r]) if stops else int(cfg["train"]["iters"])


def round_finished(folder: Path, iters: int, cfg: dict[str, Any] | None = None) -> bool:
    """A round is done when its checkpoint holds every step of the schedule; with ``cfg`` the checkpoint must have
    been trained with that round config (a one-line error otherwise: never resume another run's round)."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return False
    meta = load_model(path).meta  # the one loader (its metadata: step, config)
    trained = meta.get("config", {})
    changed = [k for k in RESUME_KEYS if cfg is not None and k in trained and trained[k] != cfg.get(k)]
    if changed:
        raise ValueError(f"{path}: trained with another config ({', '.join(changed)} differ); move it away or "
                         "train without --resume")  # fmt: skip
    return int(meta.get("step", -1)) >= iters


def make_sub_labels(previous: Path, data: WSSSDataset, k: int, sc: dict, device, progress: bool = False):
    """Features of ``data`` with the checkpoint ``previous`` (7.9 inputs) and their per-class k-means labels."""
    loaded = load_model(previous)
    model = loaded.model.to(device)
    feats = extract_features(model, loaded.spec, data, device, int(sc["feature_batch"]))
    labels = np.stack([data.labels(i) for i in range(len(data))])
    if progress:
        tqdm.write(f"k-means: {feats.shape[1]}-d features of {len(data)} images, K={k} per class")
    return cluster_sub_labels(feats, labels, k, int(sc["kmeans_seed"]), int(sc["kmeans_iters"]),
                              int(sc["kmeans_inits"]))  # fmt: skip


def train_rounds(cfg: dict[str, Any], data: WSSSDataset, out: str | Path, val: WSSSDataset | None = None,
                 pretrained: str | None = None, resume: bool = False, device: str | None = None, seed: int = 0,
                 progress: bool = True, max_steps: int | None = None) -> Path:  # fmt: skip
    """Rounds 0..``sccam.rounds`` in ``out/round{r}``; returns ``out/last.safetensors`` (the final round's).

    ``max_steps`` stops the round in progress at that step (as ``train`` does); the run then ends there and a later
    ``resume=True`` call goes on. Without ``resume`` every round and every clustering is redone.
    """
    out = Path(out)
    sc = {**SCCAM_DEFAULTS, **cfg.get("sccam", {})}
    dev = select_device(device)
    last = None
    stops = sc["round_iters"]
    if stops is not None and len(stops) != int(sc["rounds"]) + 1:
        raise ValueError(f"sccam.round_iters needs {int(sc['rounds']) + 1} entries (rounds 0..{sc['rounds']}), "
                         f"got {len(stops)}")  # fmt: skip
    for r in range(int(sc["rounds"]) + 1):
        folder, stop = out / f"round{r}", round_stop(cfg, r)
        if resume and round_finished(folder, stop, round_config(cfg, r, None)):
            last = folder / CHECKPOINT
            continue
        labels = None
        if r > 0:
            labels = folder / LABELS
            if not (resume and labels.is_file()) and _rank() == 0:
                folder.mkdir(parents=True, exist_ok=True)
                sub, inertia = make_sub_labels(last, data, int(cfg["model"]["sub_k"]), sc, dev, progress)
                save_sub_labels(labels, sub, list(data.ids), inertia)
            if dist.is_initialized():  # under torchrun the other ranks wait for rank 0's labels
                dist.barrier()
        last = train(round_config(cfg, r, labels), data, folder, val=val, pretrained=pretrained, resume=resume,
                     device=device, seed=seed, progress=progress, max_steps=min(stop, max_steps or stop))  # fmt: skip
        if not round_finished(folder, stop):  # stopped early by max_steps
            return last
    final = out / CHECKPOINT
    if _rank() == 0:
        shutil.copyfile(last, final)
    return final


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
