"""Named training configs ``<method>-<size>-<data>`` and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import difflib
import json
from typing import Any

from ..models import CAMSettings, ModelSpec
from ..models.official import COBRA_ARCH
from ..models.vgg import VGGConfig
from .cobra import COBRA_DEFAULTS
from .seco_state import SCHEDULES

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
# Pre-training the shipped tiny ViT (benchmarks/pretrain_backbone.py): cam-tiny-synth's network taught by the masks
# of a synthetic corpus (wsss.train.cam.MaskedCAMObjective), from scratch. Not a WSSS method: the CPU stand-in for
# ImageNet weights.
CONFIGS["cam-tiny-pretrain"] = {
    **copy.deepcopy(CONFIGS["cam-tiny-synth"]),
    "supervision": "masks",
    "pretrained": None,
    "pretrain": {"dense_weight": 1.0},
}
CONFIGS["cam-tiny-pretrain"]["optim"].update(lr=5e-4, warmup=100)
CONFIGS["cam-tiny-pretrain"]["train"].update(iters=2000, ckpt_every=250, log_every=50)
# The plain CAM on the tiny VGG trunk (wsss.models.vgg): full-resolution 3x3 convolutions learn classes told by
# their outline where the 8 x 8 patches of the tiny ViT do not (issue 20, docs/transfer.md). Output stride 8, as
# the ViT's patch 8; AdamW with the head at the trunk's rate (probe: 26.9%, against 26.6% for lr 3e-4, head 10x).
_TINY_VGG = {"kind": "vgg", "width": 16, "stages": 4, "convs": 2, "pools": 3, "dilate": 0, "taps": 1}
CONFIGS["cam-vgg-synth"] = {
    **copy.deepcopy(CONFIGS["cam-tiny-synth"]),
    "model": {"backbone": _TINY_VGG, "output_stride": 8, "pooling": "gmp", "lse_r": 5.0, "img_size": 112},  # r of "lse"
    "pretrained": "builtin:vgg-tiny-synth",  # broad2's masks, per pixel (benchmarks/pretrain_vgg.py)
}
CONFIGS["cam-vgg-synth"]["optim"].update(lr=1e-3, head_lr=1)
CONFIGS["cam-vgg-synth"]["data"].update(hide=0.0, hide_cell=16)  # Hide-and-Seek (wsss.train.cam.CAMObjective)
# One scale, the CAM fused with LayerCAM maps of stages 1 and 2, background 0.25: picked on 400 train images of the
# probe set (seed 0: val 38.5% against 32.0% for the pyramid 1.0 / 0.5 / 1.5 at 0.5; docs/transfer.md).
CONFIGS["cam-vgg-synth"]["cam"].update(scales=[1.0], layers=[1, 2], bkg_thresh=0.25)
CONFIGS["cam-vgg-synth"]["train"].update(iters=1500)  # within 10 min (probe, seed 0: 32.2%; 750 steps 29.5%)
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
# CoBra with cam-vgg-synth's trunk as its CNN branch (issue 20): the ViT branch as cobra-tiny-synth's, the CNN the
# trunk that learns outlines on data the package did not draw. Its seeds need no IRN; IRN masks need a ResNet CNN.
CONFIGS["cobra-vgg-synth"] = copy.deepcopy(CONFIGS["cobra-tiny-synth"])
CONFIGS["cobra-vgg-synth"]["model"]["cnn"] = dict(_TINY_VGG)
CONFIGS["cobra-vgg-synth"]["pretrained_cnn"] = "builtin:vgg-tiny-synth"
CONFIGS["cobra-vgg-synth"]["train"].update(iters=750)  # 12 epochs of 1,000 images at batch 16

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
    return {name: f"{_network_name(cfg['model'])}, crop {cfg['data']['crop']}, "
                  f"{cfg['train']['iters']} iters x batch {cfg['train']['batch_size']}"
            for name, cfg in sorted(CONFIGS.items())}  # fmt: skip


def _network_name(model: dict[str, Any]) -> str:
    cnn = model.get("cnn")
    return _backbone_name(model["backbone"]) + (f" + CNN {_backbone_name(cnn)}" if cnn else "")


def _backbone_name(backbone: dict[str, Any]) -> str:
    if backbone.get("kind") == "vgg":
        vgg = VGGConfig.from_dict(backbone)
        return f"vgg w{vgg.width} x{vgg.stages} stages, stride {vgg.output_stride}"
    return backbone["name"]


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


# Settings counted in iterations: a shorter or longer run moves each of them in proportion.
_STEP_KEYS = (("optim", "warmup"), ("seco", "proto_start"), ("seco", "cam2mask"), ("seco", "seg_from_aux_until"))


def with_iters(cfg: dict[str, Any], iters: int) -> dict[str, Any]:
    """A copy of ``cfg`` trained for ``iters`` iterations with its schedule scaled alike: the warm-up, SeCo's
    term start points (§3.13), prototype start and ROI switch move by ``iters / train.iters``; a setting at or
    past the end of the run (a switch that never happens) is left as it is."""
    out, total = copy.deepcopy(cfg), cfg["train"]["iters"]

    def scaled(step: int) -> int:  # a step at or past the end means "never" and stays so
        return step if step >= total else round(step * iters / total)

    out["train"]["iters"] = iters
    for section, key in _STEP_KEYS:
        if key in out.get(section, {}):
            out[section][key] = scaled(out[section][key])
    if "seco" in out:
        table = out["seco"]["schedule"]
        table = SCHEDULES[table] if isinstance(table, str) else table
        out["seco"]["schedule"] = {term: [scaled(start), w] for term, (start, w) in table.items()}
    return out


CONFIGS["seco-vitb16-coco"] = copy.deepcopy(CONFIGS["seco-vitb16-voc"])
CONFIGS["seco-vitb16-coco"]["train"].update(iters=80000, eval_images=5000)
CONFIGS["seco-vitb16-coco"]["cam"].update(scales=[1.0, 0.5, 0.75, 1.25, 1.5], bkg_thresh=0.45)
CONFIGS["seco-vitb16-coco"]["seco"].update(schedule="coco", bkg=0.45, high=0.65, cam2mask=50000, proto_m=0.99,
                                          proto_start=6000, seg_from_aux_until=12000)  # fmt: skip


# SEAM (§7.1). The paper's trunk is ResNet-38 (MXNet ImageNet weights); here it is a stated substitute: timm's
# ResNet-50 at output stride 8 (layer3/4 dilated), torchvision weights through pretrained_cnn. Its layer2 (512) and
# layer3 (1024) play ResNet-38's conv4 and conv5 for the PCM; the stem and layer1 (conv1a, b2*) and every
# BatchNorm are frozen. 8 epochs of VOC train_aug (10,582 // 8 x 8 = 10,576 steps), batch 8, crop 448, SGD-poly lr
# 0.01 (new layers 10x, weight decay 5e-4); the official PolyOptimizer passes its weight decay where SGD takes the
# momentum, hence momentum 5e-4 (as CoBra's Q4.3). RandomResizeLong(448, 768) on ~500 px images ~ a 0.9..1.54
# rescale; the colour jitter here is the package's (0.4, 0.4, 0.2, 0.1), always on, not SEAM's (0.3, 0.3, 0.3, 0.1).
_SEAM_SEAM = {"scale_factor": 0.3, "ohem": 0.2, "min_fraction": 0.25, "views": 2,
              "weights": {"cls": 1.0, "min": 1.0, "er": 1.0, "ecr": 1.0}}  # fmt: skip
CONFIGS["seam-r50-voc"] = {
    "method": "seam",
    "model": {"backbone": {"name": "resnet50", "strides": [1, 2, 1, 1], "fixed_bn": True, "frozen_stages": 1,
                           "extra": {"output_stride": 8}},
              "output_stride": 8, "img_size": 448, "pcm_dims": [64, 128], "pcm_out": 192, "dropout": 0.5,
              "cam_output": "pcm", "frozen": ["layer1"], "bn_affine": False},
    "pretrained": None,
    "pretrained_cnn": None,  # torchvision resnet50 weights; --set pretrained_cnn=PATH
    "data": {"crop": 448, "scale_range": [0.9, 1.54], "flip": 0.5, "jitter": 1.0, "cache_images": False},
    "optim": {"name": "sgd", "lr": 0.01, "head_lr": 10, "weight_decay": 5e-4, "momentum": 5e-4, "power": 0.9},
    "train": {"iters": 10576, "batch_size": 8, "workers": 8, "amp": True, "log_every": 50, "ckpt_every": 1322,
              "eval_every": 1322, "eval_images": 1464},
    "cam": {"input_size": None, "scales": [0.5, 1.0, 1.5, 2.0], "flip": True, "bkg_thresh": 0.26,
            "score_thresh": 0.5},
    "seam": _SEAM_SEAM,
}  # fmt: skip
# The CPU stand-in: the shipped tiny ResNet (output stride 8: stem /4, layer2 /2), the package's tiny AdamW recipe.
# At a 64 crop the paper's 0.3 view would leave a 3 x 3 grid; 0.5 leaves 4 x 4.
CONFIGS["seam-tiny-synth"] = {
    **copy.deepcopy(CONFIGS["seam-r50-voc"]),
    "model": {"backbone": {"name": "custom", "layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256],
                           "block": "basic", "strides": [1, 2, 1, 1], "fixed_bn": True, "frozen_stages": 1},
              "output_stride": 8, "img_size": 112, "pcm_dims": [64, 128], "pcm_out": 192, "dropout": 0.5,
              "cam_output": "pcm", "frozen": [], "bn_affine": True},
    "pretrained_cnn": "builtin:resnet-tiny-synth",
    "data": {"crop": 64, "scale_range": [0.5, 1.0], "flip": 0.5, "jitter": 0.0, "cache_images": True},
    "optim": {"name": "adamw", "lr": 2e-4, "weight_decay": 0.01, "warmup": 10, "warmup_ratio": 1e-6, "power": 0.9,
              "head_lr": 10},
    # 40 x 8 at a 64 px crop of a 0.5-1.0 rescale: the six runs of benchmarks/seam_vs_cam.py (3 seeds x SEAM and its
    # baseline) took 22 min with OMP_NUM_THREADS=1 on the shared 2-core machine at a load of ~20 (docs/seam.md)
    "train": {**CONFIGS["cam-tiny-synth"]["train"], "iters": 40, "batch_size": 8, "ckpt_every": 20},
    "seam": {**copy.deepcopy(_SEAM_SEAM), "scale_factor": 0.5},
}  # fmt: skip
# The baseline of the same trunk and budget: view 1 only, the classification loss only, CAMs from Y (no ER, PCM,
# ECR); benchmarks/seam_vs_cam.py.
SEAM_BASELINE = ["seam.views=1", "seam.weights.min=0", "seam.weights.er=0", "seam.weights.ecr=0",
                 "model.cam_output=cam"]  # fmt: skip
# SC-CAM (§7.2). The paper's ResNet-38 has no importable published weights here, so the VOC config is a stated
# substitute: a timm/torchvision ResNet-50 at output stride 8 (dilated layer3/4, as ResNet-38's), FixedBatchNorm,
# stem frozen (the official net freezes conv1a and b2). SGD-poly lr 0.01 (heads 10x), wd 5e-4, no momentum (the
# official PolyOptimizer never passes one), batch 16, crop 224, long side 256-512 (~0.5-1.0 of VOC's ~500 px), 61
# epochs of train_aug's 661 batches, each round stopped at the epoch the official script uses (round 0 as round 1:
# the official starting model is AffinityNet's res38_cls.pth). K = 10 sub-categories per class, lambda = 5.
_SCCAM_ITERS = 61 * 661
CONFIGS["sccam-r50-voc"] = {
    "method": "sccam",
    "model": {"backbone": {"name": "resnet50", "strides": [1, 2, 1, 1], "fixed_bn": True, "frozen_stages": 1,
                           "extra": {"output_stride": 8}, "img_size": 224},
              "output_stride": 8, "sub_k": 10, "dropout": 0.5},
    "pretrained": None,  # torchvision resnet50 ImageNet weights; --pretrained PATH
    "data": {"crop": 224, "scale_range": [0.5, 1.0], "flip": 0.5, "jitter": 1.0, "cache_images": False},
    "optim": {"name": "sgd", "lr": 0.01, "head_lr": 10, "weight_decay": 5e-4, "momentum": 0.0, "power": 0.9},
    "train": {"iters": _SCCAM_ITERS, "batch_size": 16, "workers": 8, "amp": True, "log_every": 50,
              "ckpt_every": 661, "eval_every": 0, "eval_images": 1449},
    "cam": {"input_size": None, "scales": [1.0, 0.5, 1.5, 2.0], "flip": True, "bkg_thresh": 0.15,
            "score_thresh": 0.5},
    "sccam": {"rounds": 3, "round_iters": [30 * 661, 30 * 661, 40 * 661, 50 * 661], "lambda_sub": 5.0,
              "kmeans_seed": 0, "kmeans_iters": 300, "kmeans_inits": 10, "feature_batch": 16, "sub_labels": None},
}  # fmt: skip
# The CPU config: the shipped tiny ResNet (output stride 8) on a small synthetic benchmark (400 train / 120 val
# images of 64-80 px, benchmarks/sccam_rounds.py), sized for a loaded 2-core machine: 40 AdamW-poly steps of 16
# crops of 64 px per round. K = 3 sub-categories per class: each of the 8 classes is in ~70 of the 400 training
# images, so a cluster holds ~25 images (VOC's smallest classes hold ~50 per cluster at K = 10), and each class varies
# along a few factors only (its context region shown or not, alone or with another class, size).
CONFIGS["sccam-tiny-synth"] = {
    "method": "sccam",
    "model": {"backbone": {"name": "custom", "layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256],
                           "block": "basic", "strides": [1, 2, 1, 1], "fixed_bn": False, "frozen_stages": 0,
                           "img_size": 64},
              "output_stride": 8, "sub_k": 3, "dropout": 0.5},
    "pretrained": "builtin:resnet-tiny-synth",  # the CPU stand-in for ImageNet weights (benchmarks/pretrain_cnn.py)
    "data": {"crop": 64, "scale_range": [0.75, 1.25], "flip": 0.5, "jitter": 0.8, "cache_images": True},
    "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.01, "warmup": 5, "warmup_ratio": 1e-6, "power": 0.9,
              "head_lr": 10},
    "train": {**CONFIGS["cam-tiny-synth"]["train"], "iters": 40, "batch_size": 16, "ckpt_every": 20},
    "cam": {"input_size": 64, "scales": [1.0], "flip": True, "bkg_thresh": 0.15, "score_thresh": 0.5},
    "sccam": {**CONFIGS["sccam-r50-voc"]["sccam"], "round_iters": None},
}  # fmt: skip
