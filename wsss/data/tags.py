"""Image-level tags (the foreground classes an image shows): one parser for every tag form users have.

A tag file maps image ids to one of these per-image forms, the same form for the whole file:

* class names: ``["dog", "person"]``;
* class indices into the class list (background at index 0): ``[12, 15]``;
* multi-hot vectors of length K (foreground classes 1..K) or K+1 (background first): ``[0, 1, 0, ...]``.

The background is dropped wherever it appears (its name, index 0, element 0 of a K+1 vector): tags are foreground.
Floats and booleans only occur in vectors. A file of integer lists is read as a whole, never entry by entry:

* 0/1 lists where some entry repeats a value (``[0, 1, 0, ...]``) cannot be sets of indices: they are vectors;
* otherwise, if every entry has the same length, K or K+1, and only 0/1 values, both readings fit; they are
  compared and, if they give any image different classes, the file is refused as ambiguous;
* anything else is indices.

Index and name lists may repeat a class (one tag per object). Every form is parsed into a (K,) float32 multi-hot
over classes 1..K (index k-1 <-> class k). Every error is a one-line :class:`TagError` naming the file, the image
and the cause.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

BACKGROUND = "background"
BACKGROUND_ALIASES = (BACKGROUND, "_background_", "__background__", "bg")

TagValue = str | int | float
Tags = dict[str, np.ndarray]

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(?=[eE]))([eE][+-]?\d+)?")


class TagError(ValueError):
    """A tag file is malformed, ambiguous or inconsistent with the classes; the message names file and image."""


# ------------------------------------------------------------------------------------------------------ parsing


def parse_tags(
    raw: Mapping[str, object], classes: Sequence[str], source: str | Path, class_source: str = "the class list"
) -> Tags:
    """Convert a whole tag file, deciding its form (names, indices or vectors) from all its entries.

    Args:
        raw: {image id: list, tuple or 1-D array of tags}, as read from the file.
        classes: class names, background first.
        source: the tag file, named in errors.
        class_source: where ``classes`` came from, named in errors (e.g. ``.../classes.txt``).

    Returns:
        {image id: (K,) float32 multi-hot over classes 1..K}.

    Raises:
        TagError: ambiguous file, mixed forms, unknown name, index out of range, bad vector length or value.
    """
    entries = {key: _entry_values(value, _where(source, key)) for key, value in raw.items()}
    form = _file_form(entries, len(classes) - 1, source)
    if form == "ambiguous":
        return _resolve_ambiguous(entries, classes, source, class_source)
    table = {key: _convert(form, values, classes, _where(source, key), class_source) for key, values in entries.items()}
    if form == "vector":
        _check_one_length(entries, source)
    return table


def names_to_tags(names: Iterable[str], classes: Sequence[str], where: str) -> np.ndarray:
    """Multi-hot (K,) vector from class names; the background is dropped, unknown names raise :class:`TagError`."""
    index = {c: k for k, c in enumerate(classes)}
    vec = np.zeros(len(classes) - 1, dtype=np.float32)
    for raw in names:
        name = raw.strip()
        k = index.get(name, 0 if name in BACKGROUND_ALIASES else None)
        if k is None:
            raise TagError(f"{where}: {name!r} is not a known class (known: {describe_classes(classes)})")
        if k:
            vec[k - 1] = 1.0
    return vec


def indices_to_tags(indices: Iterable[int], classes: Sequence[str], where: str, class_source: str) -> np.ndarray:
    """Multi-hot (K,) vector from class indices into ``classes`` (0, the background, is dropped)."""
    num_fg = len(classes) - 1
    vec = np.zeros(num_fg, dtype=np.float32)
    for i in indices:
        if not 0 <= i <= num_fg:
            raise TagError(
                f"{where}: class index {i} is out of range 0..{num_fg} ({class_source}: background at 0, "
                f"{num_fg} classes)"
            )
        if i:
            vec[i - 1] = 1.0
    return vec


def vector_to_tags(values: Sequence[float], num_fg: int, where: str, class_source: str) -> np.ndarray:
    """Multi-hot (K,) vector from a 0/1 vector of length K, or K+1 with the background first (dropped)."""
    if len(values) not in (num_fg, num_fg + 1):
        raise TagError(
            f"{where}: vector has length {len(values)}, but {class_source} has {num_fg} foreground classes "
            f"(expected {num_fg}, or {num_fg + 1} with background first)"
        )
    bad = [v for v in values if v not in (0, 1)]
    if bad:
        raise TagError(f"{where}: vector value {bad[0]!r} is not 0 or 1")
    return np.asarray(values[len(values) - num_fg :], dtype=np.float32)


def classes_from_tags(raw: Mapping[str, object], source: str | Path) -> tuple[str, ...]:
    """Background plus the sorted class names of a names-only tag file (numbers need a given class list)."""
    names: set[str] = set()
    for key, value in raw.items():
        where = _where(source, key)
        values = _entry_values(value, where)
        if _entry_kind(values, where) not in ("names", "empty"):
            raise TagError(
                f"{where}: class indices and 0/1 vectors need the class list (pass classes, background first)"
            )
        names.update(str(v).strip() for v in values)
    return (BACKGROUND, *sorted(names - set(BACKGROUND_ALIASES) - {""}))


def split_tag_cell(cell: str) -> list[TagValue]:
    """Tags of one CSV cell: names or numbers separated by ``;`` or ``|`` (numbers also by spaces or commas)."""
    values: list[TagValue] = []
    for token in filter(None, (t.strip() for t in re.split(r"[;|]", cell))):
        numbers = [_number(p) for p in re.split(r"[\s,]+", token)]
        values.extend(numbers if None not in numbers else [token])
    return values


def describe_classes(classes: Sequence[str]) -> str:
    """Foreground class names for messages (the first 25, then the count)."""
    fg = list(classes[1:])
    return ", ".join(fg) if len(fg) <= 25 else ", ".join(fg[:25]) + f", ... ({len(fg)} in all)"


def _where(source: str | Path, key: object) -> str:
    return f"{source}: entry {key!r}"


def _number(token: str) -> int | float | None:
    if _INT.fullmatch(token):
        return int(token)
    return float(token) if _FLOAT.fullmatch(token) else None


def _entry_values(value: object, where: str) -> list[TagValue]:
    """An entry as a plain list (1-D arrays and tuples converted, numpy scalars unwrapped)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "biufU":
            raise TagError(f"{where}: expected a 1-D array of numbers or names, got {value.dtype} {value.shape}")
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise TagError(f"{where}: must be a list of class names, class indices or a 0/1 vector, got {value!r}")
    return [v.item() if isinstance(v, np.generic) else v for v in value]


def _entry_kind(values: list[TagValue], where: str) -> str:
    """'names', 'ints', 'vector' (a float or boolean is present) or 'empty'."""
    kinds = {_value_kind(v, where) for v in values}
    if not kinds:
        return "empty"
    if "name" in kinds and len(kinds) > 1:
        raise TagError(f"{where}: mixes class names and numbers")
    return "names" if kinds == {"name"} else "ints" if kinds == {"int"} else "vector"


def _value_kind(value: object, where: str) -> str:
    if isinstance(value, str):
        return "name"
    if isinstance(value, bool | float):
        return "float"
    if isinstance(value, int):
        return "int"
    raise TagError(f"{where}: {value!r} is neither a class name nor a number")


def _file_form(entries: dict[str, list[TagValue]], num_fg: int, source: str | Path) -> str:
    """'names', 'indices', 'vector' or 'ambiguous', from every entry of the file."""
    kinds = {key: _entry_kind(values, _where(source, key)) for key, values in entries.items()}
    present = set(kinds.values()) - {"empty"}
    if "names" in present and len(present) > 1:
        named = next(k for k, v in kinds.items() if v == "names")
        numeric = next(k for k, v in kinds.items() if v not in ("names", "empty"))
        raise TagError(
            f"{_where(source, numeric)}: numbers, but entry {named!r} has class names (use one form for the file)"
        )
    if "vector" in present:
        return "vector"
    return _int_form(entries, num_fg) if "ints" in present else "names"


def _int_form(entries: dict[str, list[TagValue]], num_fg: int) -> str:
    """Integer lists: 'vector', 'indices' or 'ambiguous' (see the module docstring)."""
    if not all(v in (0, 1) for values in entries.values() for v in values):
        return "indices"
    if any(len(set(values)) < len(values) for values in entries.values()):
        return "vector"
    lengths = {len(values) for values in entries.values()}
    return "ambiguous" if len(lengths) == 1 and lengths <= {num_fg, num_fg + 1} else "indices"


def _convert(form: str, values: list[TagValue], classes: Sequence[str], where: str, class_source: str) -> np.ndarray:
    if form == "names":
        return names_to_tags(values, classes, where)
    if form == "indices":
        return indices_to_tags(values, classes, where, class_source)
    return vector_to_tags(values, len(classes) - 1, where, class_source)


def _resolve_ambiguous(
    entries: dict[str, list[TagValue]], classes: Sequence[str], source: str | Path, class_source: str
) -> Tags:
    """Both readings fit every entry: accept them if they agree, else refuse the file."""
    as_vec = {key: _convert("vector", v, classes, _where(source, key), class_source) for key, v in entries.items()}
    as_idx = {key: _convert("indices", v, classes, _where(source, key), class_source) for key, v in entries.items()}
    differ = next((key for key in entries if not np.array_equal(as_vec[key], as_idx[key])), None)
    if differ is None:
        return as_vec
    raise TagError(
        f"{source}: ambiguous tags: entry {differ!r} = {entries[differ]} reads both as class indices and as a 0/1 "
        f"vector, with different classes; write class names instead (or 0.0/1.0 floats for vectors)"
    )


def _check_one_length(entries: dict[str, list[TagValue]], source: str | Path) -> None:
    first = next(iter(entries), None)
    for key, values in entries.items():
        if len(values) != len(entries[first]):
            raise TagError(
                f"{_where(source, key)}: vector has length {len(values)}, but entry {first!r} has "
                f"{len(entries[first])} (use one length for the whole file)"
            )


# ------------------------------------------------------------------------------------------------------ .npy dicts


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The one use of ``_codecs.encode`` that array pickles need (no other codec is reachable)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing codec call encode(..., {encoding!r})")
    return text.encode("latin1")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, scalars and dtypes (plus builtin containers)."""

    _RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
    _SCALAR = np.float32(0).__reduce__()[0]
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy.core.multiarray", "scalar"): _SCALAR,
        ("numpy._core.multiarray", "scalar"): _SCALAR,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # protocol-2 pickles (e.g. SeCo's) store bytes as encode(str, "latin1")
    }

    def find_class(self, module: str, name: str) -> object:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return found


def load_npy_dict(path: Path) -> dict[str, object]:
    """The pickled dict {id: label vector} of an IRN ``cls_labels.npy`` or SeCo ``cls_labels_onehot.npy``.

    ``np.load(allow_pickle=True)`` can run arbitrary code, so the pickle is decoded with an unpickler that can only
    build numpy arrays, scalars and dtypes; anything else is refused. IRN's integer ids (``2007000032``) are
    turned back into VOC ids (``2007_000032``) as IRN's ``decode_int_filename`` does.

    Raises:
        TagError: not a readable .npy, a refused pickle, or not a dict keyed by image ids.
    """
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(f)
            obj = _ArrayOnlyUnpickler(f).load() if dtype.hasobject and shape == () else None
        if isinstance(obj, np.ndarray) and obj.shape == ():  # np.save pickles the 0-d object array holding the dict
            obj = obj.item()
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise TagError(f"{path}: malformed label .npy ({e})") from e
    if not isinstance(obj, dict):
        raise TagError(f"{path}: expected a pickled dict {{id: label vector}} (as saved by np.save)")
    return {_npy_key(key, path): value for key, value in obj.items()}


def _npy_key(key: object, path: Path) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        s = str(int(key))
        return f"{s[:4]}_{s[4:]}" if len(s) == 10 else s  # IRN's decode_int_filename (VOC ids YYYY_NNNNNN)
    raise TagError(f"{_where(path, key)}: image id must be a string (or an IRN integer id)")
