"""The model spec: one typed description of a network, written into every checkpoint, ONNX file and engine sidecar.

A spec names the family (``cam``, ``seco``, ``cobra``) and its architecture arguments, the class names, the input
normalisation and the CAM settings: everything needed to rebuild the network and to turn its raw outputs into the
seeds its authors' code produces. Families register a builder (as timm registers its constructors), so training
configs refer to a spec and never build networks themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

SEED_SOURCES = ("cnn", "vit", "avg", "max", "fuse")


@dataclass(frozen=True)
class CAMSettings:
    """How raw CAMs become seeds, in each method's official order of operations.

    Images are resized to ``input_size`` x ``input_size`` (SeCo's validation convention, §3.15) or, with
    ``input_size=None``, kept at their own size. The scale pyramid runs scale 1.0 first (quirk Q1.5):

    * SeCo / plain CAM (§1.3): ``x_s = Bil(x; floor(sH), floor(sW))``; raw CAMs upsampled to (H, W), flips merged
      by max, then ReLU; summed over scales, min-max normalised (1.5); background below ``bkg_thresh`` (1.6).
    * CoBra (§4.8, §4.9): ``x_s`` = PIL bicubic to ``round(sH), round(sW)`` on the uint8 image; ReLU on the
      feature grid, flips summed, then upsampled (4.17); max-normalised; sources combined by ``source`` (4.19);
      background ``b = Perc_theta(A_obj)`` with ``theta = bg_percentile`` (4.20).

    Without image tags, classes with ``sigmoid(logit) > score_thresh`` are used (the top class if none passes).
    ``layers`` (plain CAM on a VGG trunk): the trunk stages whose LayerCAM maps are averaged with the CAM on each
    pass (``CAMNet.layer_cams``); it needs the network's gradients, so the torch backend.
    """

    input_size: int | None = 448
    scales: tuple[float, ...] = (1.0, 0.5, 0.75, 1.5)
    flip: bool = True
    flip_merge: str = "max"  # "max" (§1.3) or "sum" (§4.8)
    relu_first: bool = False  # ReLU on the feature grid before upsampling (§4.8) instead of after (§1.3)
    rescale: str = "bilinear_floor"  # the pyramid: "bilinear_floor" (§1.3) or "pil_bicubic_round" (§4.8)
    norm: str = "minmax"  # "minmax" (1.5) or "max" (4.17)
    background: str = "threshold"  # "threshold" (1.6) or "attention_percentile" (4.20)
    bkg_thresh: float = 0.5
    bg_percentile: float = 70.0
    score_thresh: float = 0.5
    source: str | None = None  # CoBra's seed source (Table 5): cnn, vit, avg, max, fuse
    layers: tuple[int, ...] = ()  # LayerCAM stages fused with the CAM (VGG trunks); () the CAM alone

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if any(isinstance(i, bool) or int(i) != i or i < 0 for i in self.layers):
            raise ValueError(f"CAM layers must be stage indices >= 0, got {list(self.layers)}")
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        checks = {"flip_merge": ("max", "sum"), "rescale": ("bilinear_floor", "pil_bicubic_round"),
                  "norm": ("minmax", "max"), "background": ("threshold", "attention_percentile")}  # fmt: skip
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"CAM setting {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.source is not None and self.source not in SEED_SOURCES:
            raise ValueError(f"seed source must be one of {SEED_SOURCES}, got {self.source!r}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"CAM scales must be positive numbers, got {self.scales}")
        if not 0 <= self.bg_percentile <= 100:
            raise ValueError(f"bg_percentile must be in [0, 100], got {self.bg_percentile}")

    @classmethod
    def for_family(cls, family: str, values: dict[str, Any] | None = None) -> CAMSettings:
        """The family's official CAM rules (``FAMILY_CAM``) with ``values`` (a config's ``cam`` section) on top."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CAM settings {unknown}; known: {sorted(known)}")
        return cls(**{**FAMILY_CAM.get(family, {}), **values})

    def replace(self, **changes) -> CAMSettings:
        return dataclasses.replace(self, **changes)

    def override(self, scales=None, flip: bool | None = None, background: float | None = None,
                 input_size: int | None = None, source: str | None = None, layers=None) -> CAMSettings:  # fmt: skip
        """A user's changes (None keeps the setting): ``input_size=0`` keeps each image's own size, ``background``
        is the threshold or percentile (``with_background``), ``source`` exists for the attention rule only,
        ``layers=()`` turns LayerCAM off."""
        out = self if layers is None else dataclasses.replace(self, layers=tuple(layers))
        if scales is not None:
            out = dataclasses.replace(out, scales=tuple(scales))
        if flip is not None:
            out = dataclasses.replace(out, flip=flip)
        if input_size is not None:
            out = dataclasses.replace(out, input_size=input_size or None)
        if background is not None:
            out = out.with_background(background)
        if source is not None:
            if self.background != "attention_percentile":
                raise ValueError("only CoBra networks have several seed sources")
            out = dataclasses.replace(out, source=source)
        return out

    def with_background(self, value: float) -> CAMSettings:
        """The one knob a user turns: the threshold (1.6) or, for the attention rule, the percentile (4.20)."""
        if self.background == "attention_percentile":
            return dataclasses.replace(self, bg_percentile=float(value))
        return dataclasses.replace(self, bkg_thresh=float(value))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scales"], d["layers"] = list(self.scales), list(self.layers)
        return d


# The order of operations each family's official code uses (§1.3 SeCo/ToCo; §4.8, §4.9 CoBra).
FAMILY_CAM: dict[str, dict[str, Any]] = {
    "cam": {},
    "seco": {},
    "cobra": {"flip_merge": "sum", "relu_first": True, "rescale": "pil_bicubic_round", "norm": "max",
              "background": "attention_percentile", "source": "fuse", "input_size": None,
              "scales": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)},
    # SEAM (§7.1, (7.8)): PIL bicubic pyramid at round(s * size), flips and scales summed, background 0.26
    "seam": {"flip_merge": "sum", "rescale": "pil_bicubic_round", "input_size": None, "bkg_thresh": 0.26,
             "scales": (0.5, 1.0, 1.5, 2.0)},
}  # fmt: skip
# SC-CAM ([SCCAM] infer_cls.py, §7.2): ReLU on the grid, flips summed, max-normalised, background 0.15, scales
# (1, 0.5, 1.5, 2) of the PIL-bicubic image at its own size.
FAMILY_CAM["sccam"] = {"flip_merge": "sum", "relu_first": True, "rescale": "pil_bicubic_round", "norm": "max",
                       "input_size": None, "scales": (1.0, 0.5, 1.5, 2.0), "bkg_thresh": 0.15}  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """A network: family, architecture arguments, classes (background first; none for IRN), normalisation and CAM
    settings."""

    family: str
    arch: dict[str, Any]
    class_names: tuple[str, ...]
    cam: CAMSettings = field(default_factory=CAMSettings)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; registered: {', '.join(sorted(FAMILIES))}")
        if self.class_names and (len(self.class_names) < 2 or self.class_names[0] != "background"):
            raise ValueError(f"class names must start with 'background' and name at least one class, got "
                             f"{list(self.class_names)[:4]}")  # fmt: skip
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def num_fg(self) -> int:
        return len(self.class_names) - 1

    @property
    def patch_size(self) -> int:
        """The ViT patch size: the stride of the CAM grid (CoBra's CNN matches it at its training crop)."""
        if "output_stride" in self.arch:  # CNN families (SEAM, SC-CAM, segnet): the trunk's output stride
            return int(self.arch["output_stride"])
        return vit_patch_size(self.arch["backbone"])

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "arch": copy.deepcopy(self.arch), "class_names": list(self.class_names),
                "cam": self.cam.to_dict(), "mean": list(self.mean), "std": list(self.std)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        missing = [k for k in ("family", "arch", "class_names") if k not in d]
        if missing:
            raise ValueError(f"a model spec needs {missing}")
        return cls(d["family"], copy.deepcopy(d["arch"]), tuple(d["class_names"]),
                   CAMSettings.for_family(d["family"], d.get("cam")), tuple(d.get("mean", IMAGENET_MEAN)),
                   tuple(d.get("std", IMAGENET_STD)))  # fmt: skip


Builder = Callable[[dict[str, Any], int], nn.Module]
FAMILIES: dict[str, Builder] = {}


def register_family(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(arch, num_fg) -> nn.Module`` as the constructor of a family's networks."""

    def wrap(builder: Builder) -> Builder:
        FAMILIES[name] = builder
        return builder

    return wrap


def build_model(spec: ModelSpec) -> nn.Module:
    """The network a spec describes, with fresh weights; it carries its spec as ``model.spec``."""
    model = FAMILIES[spec.family](spec.arch, spec.num_fg)
    model.spec = spec
    return model


def vit_patch_size(backbone: dict[str, Any]) -> int:
    """Patch size of a backbone config: its override, else the ``patchN`` in the timm name."""
    if "patch_size" in backbone.get("overrides", {}):
        return int(backbone["overrides"]["patch_size"])
    match = re.search(r"patch(\d+)", backbone["name"])
    if match is None:
        raise ValueError(f"cannot tell the patch size of {backbone['name']!r}; set overrides.patch_size")
    return int(match.group(1))
