"""Checkpoints: safetensors with a JSON metadata block; foreign files read without unpickling objects."""

from __future__ import annotations

import _compat_pickle
import hashlib
import io
import json
import os
import pickletools
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import __version__

META_KEY = "wsss"
_WRAPPERS = ("state_dict", "model", "network", "module")  # containers training scripts save weights under
_FORMATS = ("safetensors", "torch zip", "legacy torch pickle", "unknown")  # what _sniff says of weight files
_MAGIC = (
    (b"PK\x03\x04", "torch zip"),
    (b"\x80", "legacy torch pickle"),  # pickle protocol 2+ (also a bare pickle.dump)
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89HDF", "an HDF5 file (Keras?)"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (fetch it with git lfs pull)"),
)
_TEXT = {b"{": "a JSON file", b"[": "a JSON file", b"<": "an HTML or XML page"}
# what weights_only=True lets a pickle import (torch._weights_only_unpickler._get_allowed_globals); the rest is code
_SAFE = re.compile(
    r"torch\.((cuda\.)?(sparse\.)?\w*(Storage|Tensor)|Size|device|_utils\._rebuild_\w+|_tensor\._rebuild_from_type_v2"
    r"|serialization\._get_layout|nn\.parameter\.Parameter|storage\.(Typed|Untyped)Storage)"
    r"|collections\.(OrderedDict|Counter)|_codecs\.encode|builtins\.(bytearray|set|complex)"
)
_DTYPES = {str(v) for v in vars(torch).values() if isinstance(v, (torch.dtype, torch.qscheme))}  # torch.float32...


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, hostile or of the wrong kind."""


class ForeignCheckpoint(CheckpointError):
    """A weight file of another kind (a torch pickle, or safetensors without our metadata): to import instead."""


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
    path, kind = _sniff(path)
    if kind in ("torch zip", "legacy torch pickle"):
        raise ForeignCheckpoint(
            f"{path}: a {kind} file, not a wsss checkpoint (those are .safetensors files); "
            "import foreign weights with --pretrained"
        )
    if kind != "safetensors" and (kind != "unknown" or path.suffix != ".safetensors"):
        raise _describe(path, kind)
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as err:  # SafetensorError, OSError, or whatever a broken header provokes
        raise _describe(path, kind, err) from None
    if raw is None:
        raise ForeignCheckpoint(f"{path}: no '{META_KEY}' metadata block; not a wsss checkpoint")
    try:
        return state, json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata block is not valid JSON: {err}") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a foreign weight file: .safetensors, or a torch pickle read with ``weights_only=True``.

    The format is told by the file's first bytes, not its name. Nested containers (``state_dict``, ``model``,
    ``network``) are unwrapped. Arbitrary objects are never unpickled: a file that needs them is refused.
    """
    path, kind = _sniff(path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        try:
            return load_file(str(path))
        except Exception as err:
            raise _describe(path, kind, err) from None
    if kind not in _FORMATS:
        raise _describe(path, kind)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own text advises weights_only=False: it is never passed on
        raise _describe(path, kind, err) from None
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


def _sniff(path: str | Path) -> tuple[Path, str]:
    """The file and what its first bytes say it is: one of ``_FORMATS``, or a description of another kind of file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err.strerror or err}") from None
    if not head:
        raise CheckpointError(f"{path}: empty file")
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32:  # little-endian header length, JSON
        return path, "safetensors"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return path, kind
    if all(32 <= b < 127 or b in b"\t\n\r" for b in head):  # plain text
        return path, _TEXT.get(head.lstrip()[:1], "a text file")
    return path, "unknown"


def _describe(path: Path, kind: str, err: Exception | None = None) -> CheckpointError:
    """One line saying why a file of ``kind`` did not load: not a checkpoint, holding code, or truncated or corrupt."""
    if kind not in _FORMATS:
        return CheckpointError(f"{path}: not a checkpoint: it looks like {kind}")
    found = None
    if kind in ("torch zip", "legacy torch pickle"):
        try:  # the first import beyond tensors and plain containers, from the opcodes alone: nothing is run
            if kind == "torch zip":
                with zipfile.ZipFile(path) as z:
                    stream = io.BytesIO(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
            else:
                stream = open(path, "rb")  # noqa: SIM115 (closed just below)
            with stream:
                found = next((g for g in _imports(stream) if not (_SAFE.fullmatch(g) or g in _DTYPES)), None)
        except Exception:  # an unreadable zip, or one without data.pkl: nothing to scan
            pass
    if kind != "safetensors" and found is None and (m := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))):
        found = m[1]  # torch named one the scan missed
    if found:
        return CheckpointError(
            f"{path}: holds code: refused: it would run `{found}` when loaded; only tensors are read "
            "(convert it to safetensors where you trust the file)"
        )
    looks = (
        "of unknown format (not safetensors, a torch zip or a pickle)"
        if kind == "unknown"
        else f"it looks like a {kind} file"
    )
    detail = f" ({str(err).splitlines()[0][:120]})" if isinstance(err, SafetensorError) and str(err) else ""
    return CheckpointError(f"{path}: truncated or corrupt, {looks}{detail}; re-download or re-export it")


def _imports(f) -> Iterator[str]:
    """``module.name`` of each global the pickles in ``f`` import, read from opcodes without unpickling anything."""
    strings, memo, top = [], {}, None  # string pushes (STACK_GLOBAL takes its two operands from them), memo
    try:
        for _ in range(5):  # legacy torch files: magic, protocol, sys info, the object, storage keys; then raw bytes
            for op, arg, _pos in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST", "STACK_GLOBAL"):
                    module, name = arg.split(" ", 1) if arg else strings[-2:] if len(strings) > 1 else ("?", "?")
                    yield f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"  # __builtin__ -> builtins
                    top = None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = top
                elif op.name.endswith("PUT"):
                    memo[arg] = top
                elif op.name != "FRAME":
                    top = memo.get(arg) if op.name.endswith("GET") else arg if isinstance(arg, str) else None
                    if isinstance(top, str):
                        strings.append(top)
    except Exception:  # truncated, or the raw storage bytes after a legacy file's pickles
        return
