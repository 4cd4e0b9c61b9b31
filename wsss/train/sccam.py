"""SC-CAM's objective and its pseudo sub-category labels (§7.2): features, per-class k-means (7.9), loss (7.10).

The rounds that tie these together (extract with round r-1, cluster, train a new model) are in
``wsss.train.sccam_rounds``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from ..cam.pipeline import image_pyramid
from ..data.datasets import WSSSDataset
from ..models import ModelSpec

SCCAM_DEFAULTS = {"rounds": 3, "round_iters": None, "lambda_sub": 5.0, "kmeans_seed": 0, "kmeans_iters": 300,
                  "kmeans_inits": 10, "feature_batch": 16, "sub_labels": None}  # fmt: skip


def joint_loss(parent_logits: torch.Tensor, sub_logits: torch.Tensor | None, y: torch.Tensor,
               y_sub: torch.Tensor | None, lambda_sub: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """(7.10) ``L = MLSM(H_p f, y) + lambda * MLSM(H_s f, y_s)``; without sub-category logits (round 0) only the
    parent term. The logits are taken in float32 (autocast may hand bf16)."""
    parent = F.multilabel_soft_margin_loss(parent_logits.float(), y.float())
    if sub_logits is None:
        return {"loss": parent, "cls": parent}
    sub = F.multilabel_soft_margin_loss(sub_logits.float(), y_sub.float())
    return {"loss": parent + lambda_sub * sub, "cls": parent, "sub": sub}


class SCCAMObjective(nn.Module):
    """(7.10) on a batch. The sub-category labels of every training image (N, C*K) are a buffer, looked up on the
    device by the batch's image indices; a round-0 network (``sub_k = 0``) trains on the parent term alone."""

    def __init__(self, model: nn.Module, cfg: dict):
        super().__init__()
        sc = {**SCCAM_DEFAULTS, **cfg.get("sccam", {})}
        self.lambda_sub = float(sc["lambda_sub"])
        self.joint = model.sub is not None
        labels = read_sub_labels(sc["sub_labels"], model.num_fg * model.sub_k) if self.joint else np.zeros((0, 0))
        self.register_buffer("sub_labels", torch.from_numpy(labels.astype(np.float32)))

    def trainable(self) -> list[nn.Parameter]:
        return []

    def forward(self, net: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if not self.joint:
            z, _ = net(batch["image"])
            return joint_loss(z, None, batch["labels"], None, self.lambda_sub)
        z, s = net(batch["image"], mode="joint")
        return joint_loss(z, s, batch["labels"], self.sub_labels[batch["index"]], self.lambda_sub)


def read_sub_labels(path: str | Path | None, width: int) -> np.ndarray:
    """The (N, C*K) sub-category labels a round trains on (``save_sub_labels``), checked against the network."""
    if not path:
        raise ValueError("an SC-CAM network with a sub-category head needs sccam.sub_labels (the round driver, "
                         "wsss.train.sccam_rounds, writes them)")  # fmt: skip
    labels = np.load(path)["sub_labels"]
    if labels.ndim != 2 or labels.shape[1] != width:
        raise ValueError(f"{path}: sub-category labels of shape {labels.shape}, the network has {width} sub-classes")
    return labels


def save_sub_labels(path: Path, sub_labels: np.ndarray, ids: list[str], inertia: np.ndarray) -> None:
    """Write a round's labels atomically: a file that exists is complete (resume skips the clustering)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, sub_labels=sub_labels.astype(np.uint8), ids=np.asarray(ids), inertia=inertia)
    tmp.replace(path)


@torch.no_grad()
def extract_features(model: nn.Module, spec: ModelSpec, data: WSSSDataset, device: torch.device | str,
                     batch: int = 16) -> np.ndarray:  # fmt: skip
    """``f`` (N, C_f) of every image (§7.2): the pooled feature of the eval-mode network (dropout off) on the
    scale-1 image, at the CAM input size (or each image's own size with ``input_size=None``, one at a time)."""
    model.eval()
    settings = spec.cam.replace(scales=(1.0,), flip=False)
    step = batch if settings.input_size else 1
    out = []
    for start in range(0, len(data), step):
        images = [data[i].image for i in range(start, min(start + step, len(data)))]
        x = image_pyramid(images, settings, device, spec.mean, spec.std)[0]
        out.append(model(x, mode="feature").float())
    return torch.cat(out).cpu().numpy()


def cluster_sub_labels(features: np.ndarray, labels: np.ndarray, k: int, seed: int = 0, max_iter: int = 300,
                       n_init: int = 10) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-class k-means (7.9) -> ((N, C*K) sub-category labels, (C,) inertia per class).

    For each parent class ``c`` the features of the images containing ``c`` are clustered into ``K`` groups
    (scikit-learn ``KMeans(K, random_state=seed, max_iter=300)``; ``n_init=10``, the default of the scikit-learn
    the official code ran on). Image ``i`` gets a 1 at ``c*K + cluster_i(c)`` for every class it contains: one
    sub-label per parent class. A class in fewer than ``K`` images gets one cluster per image (the official code
    would stop there; with VOC's K = 10 no class is that rare).
    """
    n, num_classes = labels.shape
    if features.shape[0] != n:
        raise ValueError(f"{features.shape[0]} features for {n} label rows")
    sub = np.zeros((n, num_classes * k), np.uint8)
    inertia = np.zeros(num_classes)
    for c in range(num_classes):
        members = np.flatnonzero(labels[:, c] > 0)
        if len(members) == 0:
            continue
        km = KMeans(n_clusters=min(k, len(members)), random_state=seed, max_iter=max_iter, n_init=n_init)
        km.fit(features[members])
        sub[members, c * k + km.labels_] = 1
        inertia[c] = km.inertia_
    return sub, inertia
