"""Named training configs ``<method>-<size>-<data>`` and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import difflib
import json
from typing import Any

from ..models import CAMSettings, ModelSpec
from ..models.official import COBRA_ARCH
from .cobra import COBRA_DEFAULTS

_TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "img_size": 112,
    "overrides": {"patch_size": 8, "depth": 4},
    "stem": "patch",
}
_VIT_B16 = {"name": "vit_base_patch16_224", "img_size": 224, "overrides": {}, "stem": "patch"}

# SeCo's recipe where it applies (§3.3, §3.14, §3.16); the tiny config is sized for 2 CPU cores. A config's
# "model" section holds the architecture arguments of its family's spec (wsss.models.spec), "cam" its CAM settings.
CONFIGS: dict[str, dict[str, Any]] = {
    "cam-tiny-synth": {
        "method": "cam",
        "model": {"backbone": _TINY_VIT, "pooling": "gmp"},
        "pretrained": "builtin:vit-tiny-synth",
        "data": {"crop": 112, "scale_range": [0.75, 1.5], "flip": 0.5, "jitter": 0.8, "cache_images": True},
        "optim": {"lr": 2e-4, "weight_decay": 0.01, "warmup": 20, "warmup_ratio": 1e-6, "power": 0.9, "head_lr": 10},
        "train": {
            "iters": 250,
            "batch_size": 32,
            "workers": 0,
            "amp": True,
            "log_every": 10,
            "ckpt_every": 50,
            "eval_every": 0,
            "eval_images": 200,
        },
        "cam": {"input_size": 112, "scales": [1.0, 0.5, 1.5], "flip": True, "bkg_thresh": 0.5, "score_thresh": 0.5},
    },  # fmt: skip
    "cam-vitb16-voc": {
        "method": "cam",
        "model": {"backbone": _VIT_B16, "pooling": "gmp"},
        "pretrained": None,
        "data": {"crop": 448, "scale_range": [0.5, 2.0], "flip": 0.5, "jitter": 0.8, "cache_images": False},
        "optim": {"lr": 6e-5, "weight_decay": 0.01, "warmup": 1500, "warmup_ratio": 1e-6, "power": 0.9, "head_lr": 10},
        "train": {
            "iters": 20000,
            "batch_size": 4,
            "workers": 8,
            "amp": True,
            "log_every": 50,
            "ckpt_every": 1000,
            "eval_every": 2000,
            "eval_images": 1449,
        },
        "cam": {
            "input_size": 448,
            "scales": [1.0, 0.5, 0.75, 1.5],
            "flip": True,
            "bkg_thresh": 0.5,
            "score_thresh": 0.5,
        },
    },  # fmt: skip
}
# SeCo (§3.16): the VOC and COCO paper settings, and a tiny CPU config on the synthetic benchmark.
_SECO_VOC = {
    "schedule": "voc", "bkg": 0.5, "high": 0.7, "low": 0.25, "cam2mask": 10000, "n_crops": 10, "local_crop": 64,
    "tag_thresh": 0.2, "proto_m": 0.9, "proto_start": 600, "queue": 4608, "momentum": 0.999, "tau_lil": 0.08,
    "tau_lig": 0.1, "lil_impl": "code", "proj_hidden": 2048, "ptc_box_rescale": False, "s_flip": 0.5,
    "energy_sigma_xy": 100.0, "energy_sigma_rgb": 15.0, "seg_from_aux_until": 0,
}  # fmt: skip
CONFIGS["seco-vitb16-voc"] = {
    **copy.deepcopy(CONFIGS["cam-vitb16-voc"]),
    "method": "seco",
    "model": {"backbone": _VIT_B16, "aux_layer": -3},
    "seco": _SECO_VOC,
}
CONFIGS["seco-vitb16-voc"]["data"]["jitter"] = 0.0  # x is rescaled, flipped and cropped only (§3.3)
CONFIGS["seco-tiny-synth"] = {
    **copy.deepcopy(CONFIGS["cam-tiny-synth"]),
    "method": "seco",
    "model": {"backbone": _TINY_VIT, "aux_layer": -3},
    "seco": {**_SECO_VOC, "schedule": {"cls": [0, 1.0], "cls_aux": [0, 1.0], "ptc": [0, 0.3], "lig": [60, 0.5],
                                       "lil": [60, 0.5], "seg": [120, 0.12], "reg": [120, 0.05]},
             "cam2mask": 100_000, "local_crop": 32, "proto_start": 40, "queue": 960, "ptc_box_rescale": True,
             "proj_hidden": 512},
}  # fmt: skip
# The ROI stays on the auxiliary CAM for the whole tiny run. The paper switches to the main CAM halfway (10,000 of
# 20,000); at 150 of 300 steps this student's main CAM still leaks cow onto grass, and crops tagged from it teach
# the leak (README, SeCo training; benchmarks/results/seco_vs_cam*.json).
CONFIGS["seco-tiny-synth"]["train"].update(iters=300, batch_size=8)
CONFIGS["seco-tiny-synth"]["data"]["jitter"] = 0.0
CONFIGS["cam-vitb16-coco"] = copy.deepcopy(CONFIGS["cam-vitb16-voc"])
CONFIGS["cam-vitb16-coco"]["train"].update(iters=80000, eval_images=5000)
CONFIGS["cam-vitb16-coco"]["cam"].update(scales=[1.0, 0.5, 0.75, 1.25, 1.5], bkg_thresh=0.45)


# CoBra (§4.2-§4.12): ResNet (CAK) + DeiT-S (SAK), SGD-poly, 20 epochs of batch 32 at 224, 7-scale CAMs.
_COBRA_CAM = {"input_size": None, "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0], "flip": True,
              "bkg_thresh": 0.5, "score_thresh": 0.5, "source": "fuse", "bg_percentile": 70.0}  # fmt: skip
_COBRA_VOC = {
    "method": "cobra",
    "model": copy.deepcopy(COBRA_ARCH),  # image logits by GAP (4.6); "pooling": "gmp" is an experiment
    "pretrained": None,  # DeiT-S weights (deit_small_patch16_224-cd65a155.pth); --pretrained
    "pretrained_cnn": None,  # torchvision resnet152-b121ed2d.pth; --set pretrained_cnn=PATH
    # Long side U(320, 640) on VOC's ~500 px images ~ a 0.64..1.28 rescale; no colour jitter (§4.2).
    "data": {"crop": 224, "scale_range": [0.64, 1.28], "flip": 0.5, "jitter": 0.0, "cache_images": False},
    "optim": {"name": "sgd", "lr": 0.1, "head_lr": 10, "weight_decay": 1e-4, "momentum": 1e-4, "power": 0.9},
    "train": {"iters": 6600, "batch_size": 32, "workers": 8, "amp": True, "log_every": 50, "ckpt_every": 330,
              "eval_every": 330, "eval_images": 1464},
    "cam": _COBRA_CAM,  # with the family's order of operations (wsss.models.spec.FAMILY_CAM)
    "cobra": dict(COBRA_DEFAULTS),  # the paper's choices; see wsss.train.cobra for the code's
}  # fmt: skip
CONFIGS["cobra-r152-deits-voc"] = _COBRA_VOC  # the paper's depth
CONFIGS["cobra-r50-deits-voc"] = copy.deepcopy(_COBRA_VOC)
CONFIGS["cobra-r50-deits-voc"]["model"]["cnn"]["name"] = "resnet50"
CONFIGS["cobra-tiny-synth"] = {
    "method": "cobra",
    "model": {"backbone": {**_TINY_VIT, "pos_resize": "dino"}, "proj_dim": 128, "pooling": "gap",
              "cnn": {"name": "custom", "layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256], "block": "basic",
                      "strides": [1, 2, 1, 1], "fixed_bn": False, "frozen_stages": 0}},
    "pretrained": "builtin:vit-tiny-synth",
    "pretrained_cnn": "builtin:resnet-tiny-synth",  # the CPU stand-in for ImageNet weights (benchmarks/pretrain_cnn.py)
    "data": {"crop": 112, "scale_range": [0.75, 1.5], "flip": 0.5, "jitter": 0.0, "cache_images": True},
    "optim": {"name": "adamw", "lr": 2e-4, "weight_decay": 0.01, "warmup": 20, "warmup_ratio": 1e-6, "power": 0.9,
              "head_lr": 10},
    "train": {**CONFIGS["cam-tiny-synth"]["train"], "batch_size": 16},
    "cam": {**_COBRA_CAM, "input_size": 112, "scales": [1.0, 0.5, 1.5]},
    "cobra": {**COBRA_DEFAULTS, "aux_start_epoch": 5},
}  # fmt: skip

# The final segmentation network on pseudo-masks (wsss.models.segnet, wsss.train.seg). DeepLabV2 R101 with the
# multi-stage papers' recipe (IRN / CONTA / CLIMS through kazuto1011's deeplab-pytorch): SGD momentum 0.9, lr 2.5e-4
# (10x ASPP), weight decay 5e-4, poly 0.9, 20,000 iterations of batch 10 (5 x 2 accumulated there), 321 crops of
# images rescaled by 0.5..1.5, flips; BatchNorm frozen. SegFormer MiT-B2 with its authors' recipe (mmseg):
# AdamW lr 6e-5 (10x head), weight decay 0.01, warm-up 1,500, poly 1.0, batch 16 at 512 crops, rescale 0.5..2.0.
# "cam" holds the inference input size of §3.15 (images resized to it, then scales 1.0 / 1.25 / 1.5).
_R101_OS8 = {"name": "resnet101", "strides": [1, 2, 1, 1], "fixed_bn": True, "frozen_stages": 0,
             "extra": {"output_stride": 8}}  # fmt: skip
CONFIGS["deeplab-r101-voc"] = {
    "method": "segnet",
    "model": {"kind": "deeplabv2", "backbone": _R101_OS8, "rates": [6, 12, 18, 24], "freeze_bn": True,
              "output_stride": 8},
    "pretrained": None,  # torchvision resnet101-63fe2227.pth (ImageNet); --pretrained
    "data": {"crop": 321, "scale_range": [0.5, 1.5], "flip": 0.5, "jitter": 0.0, "cache_images": False},
    "optim": {"name": "sgd", "lr": 2.5e-4, "head_lr": 10, "weight_decay": 5e-4, "momentum": 0.9, "power": 0.9},
    "train": {"iters": 20000, "batch_size": 10, "workers": 8, "amp": True, "log_every": 50, "ckpt_every": 1000,
              "eval_every": 2000, "eval_images": 1449},
    "cam": {"input_size": 448},
}  # fmt: skip
CONFIGS["segformer-b2-voc"] = {
    "method": "segnet",
    "model": {"kind": "segformer", "backbone": {"name": "mit_b2"}, "decoder_channels": 768, "output_stride": 4},
    "pretrained": None,  # the SegFormer authors' ImageNet-1k mit_b2.pth; --pretrained
    "data": {"crop": 512, "scale_range": [0.5, 2.0], "flip": 0.5, "jitter": 0.0, "cache_images": False},
    "optim": {"lr": 6e-5, "weight_decay": 0.01, "warmup": 1500, "warmup_ratio": 1e-6, "power": 1.0, "head_lr": 10},
    "train": {"iters": 40000, "batch_size": 16, "workers": 8, "amp": True, "log_every": 50, "ckpt_every": 1000,
              "eval_every": 4000, "eval_images": 1449},
    "cam": {"input_size": 448},
}  # fmt: skip
CONFIGS["deeplab-tiny-synth"] = {
    "method": "segnet",
    "model": {"kind": "deeplabv2", "rates": [2, 4, 6, 8], "freeze_bn": False, "output_stride": 8,
              "backbone": {"name": "custom", "layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256],
                           "block": "basic", "strides": [1, 2, 1, 1], "fixed_bn": False, "frozen_stages": 0,
                           "extra": {"output_stride": 8}}},
    "pretrained": "builtin:resnet-tiny-synth",  # the CPU stand-in for ImageNet weights (benchmarks/pretrain_cnn.py)
    "data": {"crop": 96, "scale_range": [0.75, 1.25], "flip": 0.5, "jitter": 0.0, "cache_images": True},
    "optim": {"lr": 1e-3, "weight_decay": 1e-4, "warmup": 20, "warmup_ratio": 1e-6, "power": 0.9, "head_lr": 10},
    "train": {"iters": 300, "batch_size": 16, "workers": 0, "amp": True, "log_every": 10, "ckpt_every": 50,
              "eval_every": 0, "eval_images": 300},
    "cam": {"input_size": 112},
}  # fmt: skip


def config_summaries() -> dict[str, str]:
    """Every named config with its one-line summary, sorted by name (``wsss train --list-configs``)."""
    return {name: f"{cfg['model']['backbone']['name']}, crop {cfg['data']['crop']}, {cfg['train']['iters']} iters "
                  f"x batch {cfg['train']['batch_size']}" for name, cfg in sorted(CONFIGS.items())}  # fmt: skip


def model_spec(cfg: dict[str, Any], class_names: tuple[str, ...]) -> ModelSpec:
    """The spec of the network a config trains, for a dataset's classes (background first)."""
    return ModelSpec(cfg["method"], copy.deepcopy(cfg["model"]), tuple(class_names),
                     CAMSettings.for_family(cfg["method"], cfg["cam"]))  # fmt: skip


def get_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A deep copy of the named config with ``key.sub=value`` overrides applied (values parsed as JSON)."""
    if name not in CONFIGS:
        hint = difflib.get_close_matches(name, CONFIGS, n=1)
        raise KeyError(f"unknown config {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "") +
                       f" Available: {', '.join(sorted(CONFIGS))}")  # fmt: skip
    cfg = copy.deepcopy(CONFIGS[name])
    cfg["name"] = name
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in place. The key must exist; the value is JSON (bare words are strings)."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} must look like key=value, e.g. train.iters=100")
    *parents, leaf = key.strip().split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise KeyError(f"override {item!r}: no section {'.'.join(parents[: i + 1])!r}")
        node = node[part]
    if leaf not in node:
        hint = difflib.get_close_matches(leaf, node, n=1)
        raise KeyError(f"override {item!r}: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if old is not None and value is not None and type(value) is not type(old):
        raise TypeError(f"override {item!r}: expected {type(old).__name__}, got {type(value).__name__}")
    node[leaf] = value


CONFIGS["seco-vitb16-coco"] = copy.deepcopy(CONFIGS["seco-vitb16-voc"])
CONFIGS["seco-vitb16-coco"]["train"].update(iters=80000, eval_images=5000)
CONFIGS["seco-vitb16-coco"]["cam"].update(scales=[1.0, 0.5, 0.75, 1.25, 1.5], bkg_thresh=0.45)
CONFIGS["seco-vitb16-coco"]["seco"].update(schedule="coco", bkg=0.45, high=0.65, cam2mask=50000, proto_m=0.99,
                                          proto_start=6000, seg_from_aux_until=12000)  # fmt: skip
