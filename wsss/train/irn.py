"""Training of IRN's edge/displacement heads from inter-pixel relation labels (§6.5-§6.7, CoBra §4.10).

``train_irn`` runs the whole stage: augmented (image, IR label) crops, pair labels on the stride-4 grid, losses
(6.3)-(6.6), SGD with a poly schedule, the displacement mean-shift estimate, and a safetensors checkpoint that
:func:`load_irn` reads back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..cam.irn import PathIndex, path_index, path_max
from ..data.datasets import WSSSDataset
from ..data.io import decode_image
from ..data.palette import IGNORE_INDEX, read_label_png
from ..data.transforms import normalize_images
from ..models import CheckpointError, ModelSpec, load_model, save_model
from ..models.irn import EdgeDisplacement
from ..models.resnet import ResNetConfig, ResNetTrunk, load_resnet_weights
from .loop import select_device

ImageSource = str | Path | np.ndarray  # a file, or an (H, W, 3) uint8 RGB array
LabelSource = str | Path | np.ndarray  # a label PNG, or an (H, W) uint8 array (255 = unsure)
CHECKPOINT_KIND = "irn"

# ---------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class IRNConfig:
    """IRN stage settings; the defaults are CoBra's (§4.10, §6.9): ResNet-152, 4 epochs; :meth:`irn` gives IRN's.

    ``momentum``: the official code passes the weight decay in SGD's momentum slot, so its *effective* momentum is
    1e-4 (quirk Q4.3, plain SGD in practice); 0.9 is the conventional value kept here. Set 1e-4 to reproduce.
    """

    backbone: ResNetConfig = field(default_factory=lambda: ResNetConfig(name="resnet152"))
    pretrained: str | None = None  # ImageNet trunk weights (a local file), loaded before training
    crop: int = 512
    batch_size: int = 32
    epochs: int = 4
    lr: float = 0.1
    dp_lr_mult: float = 10.0  # displacement branch LR multiplier (§6.4)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    power: float = 0.9  # poly schedule lr * (1 - t/T)^power
    scale_range: tuple[float, float] = (0.5, 1.5)
    radius_train: float = 10
    radius_infer: float = 5
    beta: float = 10
    exp_times: int = 8
    num_classes: int = 21  # pair labels need both ids < num_classes (quirk Q6.2)
    max_steps: int | None = None  # cut the run short (smoke tests); the schedule then spans max_steps
    num_workers: int = 0
    device: str | None = None  # default: cuda if available

    def __post_init__(self) -> None:
        if self.crop % 4:
            raise ValueError(f"crop must be a multiple of 4 (labels are taken at stride 4), got {self.crop}")
        r_f = math.ceil(self.radius_train) - 1
        if self.crop // 4 <= 2 * r_f:
            raise ValueError(f"crop {self.crop} leaves no source pixels at radius {self.radius_train}: "
                             f"need crop / 4 > {2 * r_f}")  # fmt: skip

    @classmethod
    def irn(cls, **kw) -> IRNConfig:
        """IRN's own defaults: ResNet-50, 3 epochs."""
        return cls(**{"backbone": ResNetConfig(name="resnet50"), "epochs": 3, **kw})

    @classmethod
    def tiny(cls, **kw) -> IRNConfig:
        """A CPU preset for tests and demos: tiny random-init trunk, crop 96, batch 8 (seconds on 2 cores)."""
        trunk = ResNetConfig(name="custom", layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), block="basic",
                             strides=(1, 2, 2, 1), fixed_bn=False, frozen_stages=0)  # fmt: skip
        return cls(**{"backbone": trunk, "crop": 96, "batch_size": 8, "epochs": 1, "device": "cpu", **kw})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IRNConfig:
        d = dict(d)
        d["backbone"] = ResNetConfig.from_dict(d["backbone"])
        d["scale_range"] = tuple(d["scale_range"])
        return cls(**d)


# --------------------------------------------------------------------------------------------------------- dataset


def normalize_image(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 ImageNet-normalised (H, W, 3)."""
    return normalize_images(img).permute(1, 2, 0).numpy()


def _rescale_pair(img: np.ndarray, label: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """PIL resize to ``round(size * scale)``: bicubic image, nearest label."""
    h, w = label.shape
    size = (max(round(w * scale), 1), max(round(h * scale), 1))
    img = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
    return img, np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))


def _random_crop_pair(
    img: np.ndarray, label: np.ndarray, crop: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop`` x ``crop`` window: random offset into larger sides, random placement of smaller ones.

    Canvas fill: 0 for the (normalised) image, 255 for the label.
    """
    h, w = label.shape
    out_img = np.zeros((crop, crop, img.shape[2]), img.dtype)
    out_lbl = np.full((crop, crop), IGNORE_INDEX, label.dtype)
    (sy, dy, ch), (sx, dx, cw) = (_window(n, crop, rng) for n in (h, w))
    out_img[dy : dy + ch, dx : dx + cw] = img[sy : sy + ch, sx : sx + cw]
    out_lbl[dy : dy + ch, dx : dx + cw] = label[sy : sy + ch, sx : sx + cw]
    return out_img, out_lbl


def _window(n: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(source start, destination start, length) along one axis."""
    if n >= crop:
        return int(rng.integers(0, n - crop + 1)), 0, crop
    return 0, int(rng.integers(0, crop - n + 1)), n


def augment_pair(
    img: np.ndarray, label: np.ndarray, crop: int, scale_range: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """§6.7: rescale U(scale_range), h-flip, normalise, random crop; label reduced x0.25 (nearest).

    Returns the normalised float32 (crop, crop, 3) image and the uint8 (crop/4, crop/4) label.
    """
    img, label = _rescale_pair(img, label, rng.uniform(*scale_range))
    if rng.random() < 0.5:
        img, label = img[:, ::-1], label[:, ::-1]
    img, label = _random_crop_pair(normalize_image(img), np.ascontiguousarray(label), crop, rng)
    small = np.array(Image.fromarray(label).resize((crop // 4, crop // 4), Image.NEAREST))
    return img, small


class IRLabelDataset(Dataset):
    """(image, IR label) pairs, augmented per §6.7; items are {"image": (3, c, c), "label": (c/4, c/4) int64}."""

    def __init__(
        self, samples: Sequence[tuple[ImageSource, LabelSource]], crop: int,
        scale_range: tuple[float, float] = (0.5, 1.5), seed: int = 0,
    ):  # fmt: skip
        if not samples:
            raise ValueError("no (image, IR label) samples given")
        self.samples, self.crop, self.scale_range, self.seed = list(samples), crop, scale_range, seed
        self.epoch = 0

    @staticmethod
    def voc_samples(data: WSSSDataset, ir_dir: str | Path) -> list[tuple[Path, Path]]:
        """Pairs for a dataset whose IR labels are PNGs named by image id in ``ir_dir``; missing ones raise."""
        ir_dir = Path(ir_dir)
        pairs = [(data.image_path(i), ir_dir / f"{id_}.png") for i, id_ in enumerate(data.ids)]
        missing = [str(p) for _, p in pairs if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} IR label(s) missing in {ir_dir}, e.g. {missing[:3]}")
        return pairs

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (image uint8 (H, W, 3), label uint8 (H, W)) of sample ``i``, sizes checked."""
        img_src, lbl_src = self.samples[i]
        img = np.asarray(img_src, np.uint8) if isinstance(img_src, np.ndarray) else decode_image(img_src)
        label = np.asarray(lbl_src, np.uint8) if isinstance(lbl_src, np.ndarray) else read_label_png(lbl_src)
        if img.ndim != 3 or img.shape[2] != 3 or label.shape != img.shape[:2]:
            raise ValueError(f"sample {i}: image {img.shape} and IR label {label.shape} must be (H, W, 3) and (H, W)")
        return img, label

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img, label = self.load(i)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img, small = augment_pair(img, label, self.crop, self.scale_range, rng)
        return {"image": torch.from_numpy(img.transpose(2, 0, 1).copy()), "label": torch.from_numpy(small).long()}


# ----------------------------------------------------------------------------------------------------------- losses


def pair_labels(label: torch.Tensor, pidx: PathIndex, num_classes: int) -> tuple[torch.Tensor, ...]:
    """§6.5: (bg_pos, fg_pos, neg), each (B, D, S) bool, for the (source, destination) pairs of ``pidx``.

    ``bg_pos = [l_s = l_d = 0]``, ``fg_pos = [l_s = l_d >= 1]``, ``neg = [l_s != l_d]``; all need both labels
    ``< num_classes`` (so 255 never counts).
    """
    if label.ndim != 3 or tuple(label.shape[-2:]) != pidx.size:
        raise ValueError(f"expected labels of shape (B, {pidx.size[0]}, {pidx.size[1]}), got {tuple(label.shape)}")
    flat = label.flatten(1).long()
    src = flat[:, pidx.tensor(pidx.src, label.device)][:, None, :]  # (B, 1, S)
    dst = flat[:, pidx.tensor(pidx.dst, label.device)]  # (B, D, S)
    valid = (src < num_classes) & (dst < num_classes)
    same = valid & (src == dst)
    return same & (src == 0), same & (src >= 1), valid & (src != dst)


def _masked_mean(loss: torch.Tensor, mask: torch.Tensor, denom_scale: float = 1.0) -> torch.Tensor:
    """``sum(mask * loss) / (denom_scale * count + 1e-5)``."""
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / (denom_scale * mask.sum() + 1e-5)


def irn_losses(
    edge_logit: torch.Tensor, disp: torch.Tensor, label: torch.Tensor, pidx: PathIndex, num_classes: int
) -> dict[str, torch.Tensor]:
    """Losses (6.3)-(6.6) over every pair of ``pidx``, vectorised; the batch is pooled in each masked mean.

    ``edge_logit`` (B, 1, h, w), ``disp`` (B, 2, h, w) and ``label`` (B, h, w) share the stride-4 grid.
    Returns ``loss`` (6.6) and its parts ``pos_bg``, ``pos_fg``, ``neg``, ``dp_fg``, ``dp_bg``.
    """
    if edge_logit.shape[-2:] != label.shape[-2:] or disp.shape[-2:] != label.shape[-2:]:
        raise ValueError(f"edge {tuple(edge_logit.shape)}, displacement {tuple(disp.shape)} and label "
                         f"{tuple(label.shape)} must share the stride-4 grid")  # fmt: skip
    bg_pos, fg_pos, neg = pair_labels(label, pidx, num_classes)
    aff = 1 - path_max(torch.sigmoid(edge_logit[:, 0]), pidx)  # (6.3)
    pos_bg = _masked_mean(-torch.log(aff + 1e-5), bg_pos)  # (6.4)
    pos_fg = _masked_mean(-torch.log(aff + 1e-5), fg_pos)
    neg_loss = _masked_mean(-torch.log(1 + 1e-5 - aff), neg)
    flat = disp.flatten(2)
    src, dst = pidx.tensor(pidx.src, disp.device), pidx.tensor(pidx.dst, disp.device)
    delta = flat[:, :, src][:, :, None, :] - flat[:, :, dst]  # (6.5) delta(s) - delta(d), (B, 2, D, S)
    target = pidx.tensor(pidx.directions, disp.device).to(disp.dtype).T[None, :, :, None]  # (1, 2, D, 1)
    dp_fg = _masked_mean((delta - target).abs().sum(1), fg_pos, 2.0)
    dp_bg = _masked_mean(delta.abs().sum(1), bg_pos, 2.0)
    loss = (pos_bg / 2 + pos_fg / 2 + neg_loss) / 2 + (dp_fg + dp_bg) / 2  # (6.6)
    return {"loss": loss, "pos_bg": pos_bg, "pos_fg": pos_fg, "neg": neg_loss, "dp_fg": dp_fg, "dp_bg": dp_bg}


# --------------------------------------------------------------------------------------------------------- training


def cobra_irn_trunk(cnn: dict) -> ResNetConfig:
    """IRN's ResNet for CoBra (§4.10): the CNN branch's architecture at output stride 16 with fixed BN."""
    if cnn.get("kind") == "vgg":
        raise ValueError("IRN reads the five stages of a ResNet, and this CoBra network's CNN branch is a VGG trunk: "
                         "it makes CAMs and seeds (wsss label), not CoBra's IRN masks")  # fmt: skip
    return dataclasses.replace(ResNetConfig.from_dict(cnn), strides=(1, 2, 2, 1), fixed_bn=True)


def build_irn(cfg: IRNConfig) -> EdgeDisplacement:
    """The network of ``cfg``, with the pretrained trunk weights loaded if ``cfg.pretrained`` is set."""
    trunk = ResNetTrunk(cfg.backbone)
    if cfg.pretrained is not None:
        load_resnet_weights(trunk, cfg.pretrained).check(allow_unexpected=True)
    return EdgeDisplacement(trunk)


def make_optimizer(model: EdgeDisplacement, cfg: IRNConfig) -> torch.optim.SGD:
    """SGD with the edge branch at ``lr`` and the displacement branch at ``dp_lr_mult * lr`` (§6.4, §6.7)."""
    edge, disp = model.param_groups()
    groups = [{"params": edge, "lr": cfg.lr, "base_lr": cfg.lr},
              {"params": disp, "lr": cfg.lr * cfg.dp_lr_mult, "base_lr": cfg.lr * cfg.dp_lr_mult}]  # fmt: skip
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_poly_lr(opt: torch.optim.Optimizer, step: int, total: int, power: float) -> None:
    """Poly schedule: ``lr_g = base_lr_g * (1 - step/total)^power``."""
    factor = max(1 - step / total, 0.0) ** power
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def train_irn(
    cfg: IRNConfig,
    samples: Sequence[tuple[ImageSource, LabelSource]],
    out_path: str | Path,
    seed: int = 0,
    progress: bool = True,
    meanshift_images: Sequence[ImageSource] | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Train IRN's heads on (image, IR label) pairs, estimate the mean shift and save a checkpoint (§6.7).

    ``meanshift_images`` is the ``infer_list`` (CoBra: train_aug; IRN: train); default: the training images.
    ``log(step, losses)`` is called after every step. Returns ``out_path``.
    """
    device = select_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed-size crops: cuDNN times its convolutions once
    torch.manual_seed(seed)
    model = build_irn(cfg).to(device).train()
    data = IRLabelDataset(samples, cfg.crop, cfg.scale_range, seed)
    per_epoch = len(data) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(data)} samples make no full batch of {cfg.batch_size} (batches drop the last one)")
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    opt = make_optimizer(model, cfg)
    pidx = path_index(cfg.radius_train, (cfg.crop // 4, cfg.crop // 4))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="train irn", disable=not progress)
    step = 0
    while step < total:
        data.epoch = step // per_epoch
        loader = DataLoader(data, cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
                            generator=gen)  # fmt: skip
        for batch in loader:
            if step >= total:
                break
            set_poly_lr(opt, step, total, cfg.power)
            edge, disp = model(batch["image"].to(device))
            losses = irn_losses(edge, disp, batch["label"].to(device), pidx, cfg.num_classes)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step += 1
            bar.update(1)
            if log is not None or step % 10 == 0 or step == total:  # host sync only when reporting
                values = {k: v.item() for k, v in losses.items()}
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                if log is not None:
                    log(step, values)
    bar.close()
    images = meanshift_images if meanshift_images is not None else [s[0] for s in samples]
    estimate_mean_shift(model, images, cfg.crop, cfg.batch_size, device)
    spec = ModelSpec("irn", {"backbone": dataclasses.asdict(cfg.backbone)}, ())
    return save_model(out_path, model, spec, kind=CHECKPOINT_KIND, config=cfg.to_dict(), seed=seed, steps=step,
                      mean_shift=model.mean_shift.running_mean.tolist())  # fmt: skip


def _top_left(img: np.ndarray, crop: int) -> np.ndarray:
    """Normalised top-left ``crop`` x ``crop`` window, zero-filled where the image is smaller."""
    out = np.zeros((crop, crop, 3), np.float32)
    part = normalize_image(img[:crop, :crop])
    out[: part.shape[0], : part.shape[1]] = part
    return out


@torch.no_grad()
def estimate_mean_shift(
    model: EdgeDisplacement, images: Sequence[ImageSource], crop: int, batch_size: int, device: torch.device | str
) -> torch.Tensor:
    """§6.7: ``running_mean = mean over images of the per-image mean of delta`` on top-left crops; sets and returns it.

    As in the reference only full batches count (drop_last); with fewer images than one batch, all are used.
    """
    if not images:
        raise ValueError("no images for the mean-shift estimate")
    n = len(images) if len(images) < batch_size else len(images) // batch_size * batch_size
    model.eval()
    model.mean_shift.running_mean.zero_()
    means = []
    for start in range(0, n, batch_size):
        chunk = [np.asarray(im, np.uint8) if isinstance(im, np.ndarray) else decode_image(im)
                 for im in images[start : min(start + batch_size, n)]]  # fmt: skip
        x = torch.from_numpy(np.stack([_top_left(im, crop) for im in chunk]).transpose(0, 3, 1, 2)).to(device)
        means.append(model(x)[1].mean(dim=(2, 3)))
    mean = torch.cat(means).mean(0)
    model.mean_shift.running_mean.copy_(mean)
    return mean


def load_irn(path: str | Path, device: torch.device | str = "cpu") -> tuple[EdgeDisplacement, IRNConfig]:
    """A trained IRN (eval mode) and its config from a :func:`train_irn` checkpoint, through the one loader."""
    loaded = load_model(path)
    if loaded.spec.family != "irn":
        raise CheckpointError(f"{path}: not an IRN checkpoint (a {loaded.spec.family} network)")
    return loaded.model.to(device).eval(), IRNConfig.from_dict(loaded.meta["config"])
