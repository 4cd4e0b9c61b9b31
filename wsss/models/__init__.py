"""Networks, their specs and the one checkpoint loader. Models know nothing of training."""

from __future__ import annotations

from . import cam_net, cobra, irn, seco, segnet  # noqa: F401  (each registers its family)
from .backbone import BackboneConfig
from .cam_net import CAMNet
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cobra import CoBraNet
from .loading import LoadedModel, load_model, load_pretrained, load_state_into, save_model, spec_from_meta
from .report import LoadReport
from .seco import SeCoNet
from .spec import FAMILIES, CAMSettings, ModelSpec, build_model, register_family

__all__ = [
    "FAMILIES", "BackboneConfig", "CAMNet", "CAMSettings", "CheckpointError", "CoBraNet", "LoadReport",
    "LoadedModel", "ModelSpec", "SeCoNet", "build_model", "load_checkpoint", "load_model", "load_pretrained",
    "load_state_into", "register_family", "save_checkpoint", "save_model", "spec_from_meta",
]  # fmt: skip
