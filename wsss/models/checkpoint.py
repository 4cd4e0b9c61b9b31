"""Checkpoints: safetensors with a JSON metadata block; foreign files read without unpickling objects."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import __version__

META_KEY = "wsss"
_WRAPPERS = ("state_dict", "model", "network", "module")  # containers training scripts save weights under


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, hostile or of the wrong kind."""


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write ``state_dict`` and ``meta`` (JSON-serialisable) to a .safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"package_version": __version__, **meta}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read one of our checkpoints: (state_dict, metadata). Raises CheckpointError with the reason."""
    path = _existing(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: wsss checkpoints are .safetensors files; import foreign ones with --pretrained")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {err}") from err
    if raw is None:
        raise CheckpointError(f"{path}: no '{META_KEY}' metadata block; not a wsss checkpoint")
    try:
        return state, json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata block is not valid JSON: {err}") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a foreign weight file: .safetensors, or a torch pickle read with ``weights_only=True``.

    Nested containers (``state_dict``, ``model``, ``network``) are unwrapped. Arbitrary objects are never
    unpickled: a file that needs them is refused.
    """
    path = _existing(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor file (it is corrupt, or holds Python objects beyond "
            f"tensors, which weights_only=True forbids; convert it to safetensors in a trusted environment): {err}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable torch file (truncated or corrupt?): {err}") from err
    while isinstance(obj, dict) and (key := next((k for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)):
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    return path
