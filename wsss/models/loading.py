"""The one checkpoint loader: every command and API gets its networks through ``load_model``.

It reads our safetensors checkpoints (the spec inside), the official SeCo file (plain or DDP), the official
CoBra pair, and, through ``load_pretrained``, timm / torchvision backbone files. Foreign layouts go through one
filter function per family (``wsss.models.official``); every import returns the same ``LoadReport``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .backbone import load_backbone_weights
from .checkpoint import (
    CheckpointError,
    ForeignCheckpoint,
    file_sha256,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from .official import cobra_filter, cobra_partner, describe_unknown, detect_layout, read_cobra_file, seco_filter
from .report import LoadReport, fit_state
from .resnet import ResNetTrunk, load_resnet_weights
from .segnet import SegNet, load_segnet_backbone
from .spec import CAMSettings, ModelSpec, build_model
from .vgg import VGGTrunk, load_vgg_weights

SPEC_KEY = "spec"
BUILTIN_WEIGHTS = Path(__file__).resolve().parent / "weights"  # the shipped tiny backbones, "builtin:NAME"


@dataclass
class LoadedModel:
    """A network in eval mode on the CPU, its spec, the checkpoint's metadata and the import report."""

    model: nn.Module
    spec: ModelSpec
    meta: dict
    report: LoadReport


def load_model(path: str | Path, vit_path: str | Path | None = None, arch: dict | None = None,
               class_names: list[str] | None = None) -> LoadedModel:  # fmt: skip
    """Any checkpoint wsss knows, as a network with its spec.

    Official CoBra checkpoints are two files: ``path`` is either of them and ``vit_path`` the other; without
    ``vit_path`` the partner is found next to ``path`` by the official naming (``ep19_cnn_checkpoint.pth`` <->
    ``ep19_tf_checkpoint.pth``). ``arch`` overrides the official architecture of imported files (small test
    networks); ``class_names`` names an imported network's classes (default: VOC for 20, COCO for 80).
    """
    path = Path(path)
    ours = _read_wsss(path)
    if ours is not None:
        if vit_path is not None:
            raise CheckpointError(f"{path}: a wsss checkpoint holds every branch; --vit-ckpt is for official CoBra "
                                  "pairs only")  # fmt: skip
        return _build_wsss(path, *ours)
    state = read_state_dict(path)
    layout = detect_layout(list(state))
    if layout is None:
        raise CheckpointError(f"{path}: matches no model family: {describe_unknown(list(state))}")
    sources = {"source_sha256": file_sha256(path), "imported_from": str(path)}
    if layout == "seco":
        if vit_path is not None:
            raise CheckpointError(f"{path}: --vit-ckpt is for official CoBra pairs; this is a SeCo checkpoint")
        model, spec, report = seco_filter(state, str(path), arch)
        if class_names is not None:
            spec = _renamed(spec, class_names, path)
            model.spec = spec
        return LoadedModel(model, spec, sources, report)
    branch = layout.removeprefix("cobra-")
    other = Path(vit_path) if vit_path is not None else cobra_partner(path, branch)
    if other is None:
        want = "ViT file (ep19_tf_checkpoint.pth)" if branch == "cnn" else "CNN file (ep19_cnn_checkpoint.pth)"
        raise CheckpointError(f"{path}: official CoBra checkpoints come in two files and its {want} was not found "
                              "next to it; pass it with --vit-ckpt")  # fmt: skip
    cnn_path, vit_file = (path, other) if branch == "cnn" else (other, path)
    cnn_state = state if branch == "cnn" else read_cobra_file(cnn_path, "cnn")
    vit_state = state if branch == "vit" else read_cobra_file(vit_file, "vit")
    model, spec, report = cobra_filter(cnn_state, vit_state, f"{cnn_path} + {vit_file}", arch, class_names)
    meta = {"source_sha256": file_sha256(cnn_path), "source_sha256_vit": file_sha256(vit_file),
            "imported_from": {"cnn": str(cnn_path), "vit": str(vit_file)}}  # fmt: skip
    return LoadedModel(model, spec, meta, report)


def load_state_into(model: nn.Module, path: str | Path) -> tuple[dict, LoadReport]:
    """Our checkpoint's weights into an already built network of the same spec (``train --resume``)."""
    state, meta = load_checkpoint(path)
    spec = spec_from_meta(meta, path)
    built = getattr(model, "spec", None)
    if built is not None and built.family != spec.family:
        raise CheckpointError(f"{path}: a {spec.family} checkpoint cannot resume a {built.family} network")
    report = LoadReport(str(path), "wsss")
    fitting = fit_state(model, state, report)
    report.check()  # a one-line error before torch's own
    model.load_state_dict(fitting)
    return meta, report


def load_pretrained(model: nn.Module, path: str | Path, part: str = "backbone") -> LoadReport:
    """Local timm / torchvision weights into ``model.backbone`` (a ViT, ResNet or VGG trunk) or ``model.cnn``
    (CoBra's CNN branch, a ResNet or VGG trunk).

    ``builtin:NAME`` names a file shipped in ``wsss/models/weights`` (the CPU stand-ins for ImageNet weights).
    """
    path = resolve_weights(path)
    if part == "backbone" and isinstance(model, SegNet):
        return load_segnet_backbone(model, path)
    if part == "backbone" and not hasattr(model, "backbone"):  # SEAM: a ResNet only
        raise ValueError(f"{path}: {type(model).__name__} has no ViT backbone; its ResNet starts from "
                         "--set pretrained_cnn=PATH")  # fmt: skip
    if part == "backbone" and isinstance(model.backbone, ResNetTrunk):  # a CNN family (SC-CAM)
        return load_resnet_weights(model.backbone, path)
    if part == "backbone" and isinstance(model.backbone, VGGTrunk):  # the plain CAM on a VGG trunk
        return load_vgg_weights(model.backbone, path)
    if part == "backbone":
        return load_backbone_weights(model.backbone, path)
    if part == "cnn":
        return (load_vgg_weights if isinstance(model.cnn, VGGTrunk) else load_resnet_weights)(model.cnn, path)
    raise ValueError(f"part must be 'backbone' or 'cnn', got {part!r}")


def resolve_weights(name: str | Path) -> Path:
    """``builtin:NAME`` -> the shipped file; anything else is a local path."""
    name = str(name)
    if not name.startswith("builtin:"):
        return Path(name)
    path = BUILTIN_WEIGHTS / f"{name.split(':', 1)[1]}.safetensors"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BUILTIN_WEIGHTS.glob("*.safetensors")))
        raise CheckpointError(f"{name}: no such built-in weights (shipped: {known})")
    return path


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec, **meta) -> Path:
    """Our checkpoint: the weights and, in the metadata, the spec and ``meta`` (step, config, seed, ...)."""
    return save_checkpoint(path, model.state_dict(), {SPEC_KEY: spec.to_dict(), **meta})


def spec_from_meta(meta: dict, path: str | Path = "") -> ModelSpec:
    """The spec of a checkpoint's (or an ONNX file's) metadata; also reads the pre-spec layout of earlier files
    (``method``, ``model``, ``class_names``, ``config.cam``)."""
    try:
        if SPEC_KEY in meta:
            return ModelSpec.from_dict(meta[SPEC_KEY])
        if meta.get("kind") == "irn" and "config" in meta:
            return ModelSpec("irn", {"backbone": meta["config"]["backbone"]}, ())
        if {"method", "model", "class_names"} <= set(meta):
            cam = _legacy_cam(meta.get("config", {}).get("cam", {}), meta["method"])
            spec = ModelSpec(meta["method"], meta["model"], tuple(meta["class_names"]),
                             CAMSettings.for_family(meta["method"], cam))  # fmt: skip
            return spec.replace(**{k: tuple(meta[k]) for k in ("mean", "std") if k in meta})
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: the model spec in the metadata is invalid: {err}") from err
    raise CheckpointError(f"{path}: the metadata holds no model spec; not a wsss model checkpoint")


def _legacy_cam(cam: dict, family: str) -> dict:
    """CAM settings of earlier checkpoints: only the keys they had, in their meaning."""
    keep = ("input_size", "scales", "flip", "bkg_thresh", "score_thresh", "source", "bg_percentile")
    return {k: v for k, v in cam.items() if k in keep and not (k == "source" and v is None and family == "cobra")}


def _read_wsss(path: Path) -> tuple[dict, dict] | None:
    """(state, metadata) of our checkpoint, or None for a file of another kind (read once either way)."""
    try:
        return load_checkpoint(path)
    except ForeignCheckpoint:  # someone else's safetensors file: imported by the caller
        return None


def _build_wsss(path: Path, state: dict, meta: dict) -> LoadedModel:
    spec = spec_from_meta(meta, path)
    model = build_model(spec)
    report = LoadReport(str(path), "wsss")
    fitting = fit_state(model, state, report)
    report.check()  # a one-line error before torch's own
    model.load_state_dict(fitting)
    return LoadedModel(model.eval(), spec, {**meta, "source_sha256": file_sha256(path)}, report)


def _renamed(spec: ModelSpec, class_names: list[str], path: Path) -> ModelSpec:
    if len(class_names) != len(spec.class_names):
        raise CheckpointError(f"{path}: {len(class_names)} class names for a network of {spec.num_fg} + 1 classes")
    return spec.replace(class_names=tuple(class_names))
