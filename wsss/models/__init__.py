"""Networks and their checkpoints. Models know nothing of training."""

from __future__ import annotations

from torch import nn

from .backbone import BackboneConfig, load_backbone_weights
from .cam_net import CAMNet
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cobra import CoBraNet
from .resnet import ResNetConfig
from .seco import SeCoNet

METHODS = ("cam", "seco", "cobra")


def build_model(method: str, model_cfg: dict, num_fg: int) -> nn.Module:
    """The network of ``method`` from a plain-dict model config (as stored in checkpoint metadata)."""
    backbone = BackboneConfig(**model_cfg["backbone"])
    if method == "cam":
        return CAMNet(backbone, num_fg, pooling=model_cfg.get("pooling", "gmp"))
    if method == "seco":
        return SeCoNet(backbone, num_fg, aux_layer=model_cfg.get("aux_layer", -3))
    if method == "cobra":
        if "cnn" not in model_cfg:
            raise ValueError("a CoBra model config needs a 'cnn' section (the ResNet branch)")
        return CoBraNet(ResNetConfig.from_dict(model_cfg["cnn"]), backbone, num_fg, model_cfg.get("proj_dim", 256),
                        model_cfg.get("pooling", "gap"))  # fmt: skip
    raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")


def load_model(path) -> tuple[nn.Module, dict]:
    """A network and its metadata from one of our checkpoints, in eval mode on the CPU."""
    state, meta = load_checkpoint(path)
    for key in ("method", "model", "class_names"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata lacks '{key}'")
    model = build_model(meta["method"], meta["model"], len(meta["class_names"]) - 1)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not fit the {meta['method']} network: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit the {meta['method']} network: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval(), meta


__all__ = [
    "BackboneConfig", "CAMNet", "CoBraNet", "SeCoNet", "CheckpointError", "build_model", "load_model",
    "load_backbone_weights", "load_checkpoint", "save_checkpoint",
]  # fmt: skip
