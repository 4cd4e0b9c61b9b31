"""Import official research checkpoints by explicit key tables (never by unpickling objects).

SeCo (``model/model_seco.py: network``, saved as ``model.state_dict()``, possibly under DDP's ``module.``):
the student ViT-B/16 under ``encoder.*`` (timm key names), ``classifier.weight`` and ``aux_classifier.weight``
(K x 768 x 1 x 1, no bias), the ASPP decoder ``decoder.c{0..3}.{weight,bias}``. The key encoder, the projection
heads and the contrastive buffers serve training only and are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.palette import COCO_CLASSES, VOC_CLASSES
from .backbone import BackboneConfig
from .checkpoint import CheckpointError, file_sha256, load_checkpoint, read_state_dict
from .seco import SeCoNet

# (pattern, replacement); a key matching no rule is "unexpected", one matching a None rule is skipped.
SECO_KEYS: list[tuple[str, str | None]] = [
    (r"^encoder\.head\..*", None),
    (r"^encoder_k\..*", None),
    (r"^proj_head(_t)?\..*", None),
    (r"^(prototypes|queue|queue_label_flag|queue_ptr)$", None),
    (r"^encoder\.(.*)$", r"backbone.\1"),
    (r"^(classifier|aux_classifier)\.weight$", r"\1.weight"),
    (r"^decoder\.(c\d)\.(weight|bias)$", r"decoder.\1.\2"),
]

SECO_CAM = {"input_size": 448, "scales": [1.0, 0.5, 0.75, 1.5], "flip": True, "bkg_thresh": 0.5, "score_thresh": 0.5}


@dataclass
class ImportReport:
    method: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.method}: loaded {self.loaded} tensors, skipped {len(self.skipped)} training-only tensors"]
        for name in ("missing", "unexpected", "mismatched"):
            if items := getattr(self, name):
                lines.append(f"  {name} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        return "\n".join(lines)


def detect_method(keys: list[str]) -> str:
    """Guess which official layout a state dict follows from its keys."""
    keys = [k.removeprefix("module.") for k in keys]
    if any(k.startswith("encoder.blocks.") for k in keys) and "classifier.weight" in keys:
        return "seco"
    if any(k.startswith(("resnet50.", "stage1.")) for k in keys):
        return "cobra"
    raise CheckpointError("unrecognised checkpoint layout: neither a wsss, SeCo nor CoBra state dict")


def map_keys(state: dict[str, torch.Tensor], table: list[tuple[str, str | None]]):
    """Rename by the first matching rule; returns (mapped, skipped, unexpected)."""
    mapped, skipped, unexpected = {}, [], []
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        for pattern, repl in table:
            if re.match(pattern, key):
                if repl is None:
                    skipped.append(key)
                else:
                    mapped[re.sub(pattern, repl, key)] = tensor
                break
        else:
            unexpected.append(key)
    return mapped, skipped, unexpected


SECO_BACKBONE = {"name": "vit_base_patch16_224", "overrides": {}}


def import_seco(
    state: dict[str, torch.Tensor], source: str = "", backbone: dict | None = None
) -> tuple[SeCoNet, dict, ImportReport]:
    """An official SeCo state dict as a SeCoNet with metadata; strict about what it loads.

    ``backbone`` (name and overrides) defaults to SeCo's ViT-B/16; the position grid is read from the weights.
    """
    mapped, skipped, unexpected = map_keys(state, SECO_KEYS)
    if "classifier.weight" not in mapped:
        raise CheckpointError(f"{source}: no classifier.weight: not a SeCo network state dict")
    num_fg = mapped["classifier.weight"].shape[0]
    classes = VOC_CLASSES if num_fg == 20 else COCO_CLASSES if num_fg == 80 else _generic(num_fg)
    if "backbone.pos_embed" not in mapped or "backbone.patch_embed.proj.weight" not in mapped:
        raise CheckpointError(f"{source}: SeCo checkpoint lacks the encoder's position or patch embedding")
    grid = int(round((mapped["backbone.pos_embed"].shape[1] - 1) ** 0.5))
    patch = mapped["backbone.patch_embed.proj.weight"].shape[-1]
    backbone = {**SECO_BACKBONE, **(backbone or {}), "img_size": patch * grid}
    model = SeCoNet(BackboneConfig(**backbone), num_fg)
    report = ImportReport("seco", skipped=skipped, unexpected=unexpected)
    target = model.state_dict()
    fitting = {}
    for key, tensor in mapped.items():
        if key not in target:
            report.unexpected.append(key)
        elif tensor.shape != target[key].shape:
            report.mismatched.append(f"{key} {tuple(tensor.shape)} != {tuple(target[key].shape)}")
        else:
            fitting[key] = tensor
    report.missing = [k for k in target if k not in fitting]
    report.loaded = len(fitting)
    if report.missing or report.mismatched:
        raise CheckpointError(f"{source}: SeCo checkpoint does not fit the network\n{report}")
    model.load_state_dict(fitting)
    cam = {**SECO_CAM, "bkg_thresh": 0.45} if num_fg == 80 else SECO_CAM
    meta = {
        "method": "seco", "model": {"backbone": backbone, "aux_layer": -3}, "class_names": list(classes),
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "config": {"cam": cam}, "imported_from": source,
    }  # fmt: skip
    return model.eval(), meta, report


def load_any(path: str | Path, method: str = "auto") -> tuple[torch.nn.Module, dict, ImportReport | None]:
    """Our checkpoint (.safetensors with metadata) or an official one; returns (model, meta, import report)."""
    from . import load_model

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            load_checkpoint(path)
            model, meta = load_model(path)
            return model, {**meta, "source_sha256": file_sha256(path)}, None
        except CheckpointError as err:
            if "metadata" not in str(err):
                raise
    state = read_state_dict(path)
    kind = detect_method(list(state)) if method == "auto" else method
    if kind != "seco":
        raise CheckpointError(f"{path}: importing official {kind} checkpoints is not supported yet")
    model, meta, report = import_seco(state, str(path))
    return model, {**meta, "source_sha256": file_sha256(path)}, report


def _generic(num_fg: int) -> tuple[str, ...]:
    return ("background", *(f"class_{i}" for i in range(1, num_fg + 1)))
