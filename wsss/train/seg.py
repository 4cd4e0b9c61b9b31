"""Training the final segmentation network on pseudo-masks (the last stage of a multi-stage WSSS pipeline).

The network (``wsss.models.segnet``, family ``segnet``) learns per-pixel cross-entropy against masks from
``wsss label``, ``wsss cobra-masks`` or any folder of palette PNGs, 255 ignored; the shared training loop
(``wsss.train.loop``) brings resume, AMP, torchrun and metrics. ``train_segmentation`` is the Python entry point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..data.datasets import DatasetError, WSSSDataset
from ..data.masks import MaskedDataset
from ..data.palette import IGNORE_INDEX
from ..data.transforms import AugmentConfig, augment_with_mask, to_tensor


class SegTrainSet(Dataset):
    """Augmented (image, mask) views; the masks are the dataset's (``MaskedDataset``: the pseudo-masks)."""

    def __init__(self, data: WSSSDataset, aug: AugmentConfig, seed: int, cache: bool, progress: bool = False):
        missing = [data.ids[i] for i in range(len(data)) if data.mask_path(i) is None]
        if missing:
            raise DatasetError(f"{len(missing)} training images have no mask, e.g. {missing[0]}: pass --masks DIR")
        self.data, self.aug, self.seed = data, aug, seed
        indices = tqdm(range(len(data)), desc="cache images", leave=False, disable=not progress)
        self.cache = [self._pair(i) for i in indices] if cache else None

    def _pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.data[i]
        return sample.image, sample.mask

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``key`` = (epoch, image index), as ``wsss.train.loop.TrainSet``: resume sees the same batches."""
        epoch, i = key
        img, mask = self.cache[i] if self.cache is not None else self._pair(i)
        crop, crop_mask = augment_with_mask(img, mask, self.aug, np.random.default_rng([self.seed, epoch, i]))
        return {"image": to_tensor(crop), "mask": torch.from_numpy(crop_mask.astype(np.int64))}


class SegObjective(nn.Module):
    """Per-pixel cross-entropy of the logits, upsampled bilinearly (ac=False) to the crop, ignoring 255."""

    def __init__(self, model: nn.Module, cfg: dict):
        super().__init__()

    def trainable(self) -> list[nn.Parameter]:
        return []

    def forward(self, net: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits = net(batch["image"])
        up = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(up.float(), batch["mask"], ignore_index=IGNORE_INDEX)
        return {"loss": loss, "seg": loss}


def seg_training_set(cfg: dict[str, Any], data: WSSSDataset, seed: int, progress: bool = False) -> SegTrainSet:
    d = cfg["data"]
    aug = AugmentConfig(d["crop"], tuple(d["scale_range"]), d["flip"], d["jitter"])
    return SegTrainSet(data, aug, seed, d.get("cache_images", False), progress)


def train_segmentation(cfg: dict[str, Any], data: WSSSDataset, masks_dir: str | Path | None, out: str | Path,
                       **train_kw) -> Path:  # fmt: skip
    """Train the ``segnet`` config ``cfg`` on ``data``'s images with the masks of ``masks_dir`` (None: the
    dataset's own masks); returns ``out/last.safetensors``. ``train_kw`` go to ``wsss.train.loop.train`` (val,
    pretrained, resume, device, seed, progress, max_steps)."""
    from .loop import train

    if cfg["method"] != "segnet":
        raise ValueError(f"config {cfg.get('name', cfg['method'])!r} trains a {cfg['method']} network, not a "
                         "segmentation network (e.g. deeplab-tiny-synth)")  # fmt: skip
    return train(cfg, MaskedDataset(data, masks_dir) if masks_dir is not None else data, out, **train_kw)
