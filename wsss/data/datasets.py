"""Dataset readers (PASCAL VOC, COCO in SeCo's VOC-style layout, plain folders) behind one interface.

Every reader validates its inputs when constructed (folders, split lists, image files, label files) and raises
:class:`DatasetError` naming the offending file and line. Per-image sources (masks, VOC XML annotations) are read
lazily, so their errors surface on first access, still as :class:`DatasetError`.

Image-level tags in every form (class names, class indices, K or K+1 multi-hot vectors, IRN/SeCo ``.npy`` dicts)
are parsed by :mod:`wsss.data.tags`, the one tag parser of all readers; the background is dropped from tags.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss.data.io import IMAGE_EXTENSIONS, decode_image
from wsss.data.palette import COCO_CLASSES, IGNORE_INDEX, VOC_CLASSES, read_label_png
from wsss.data.tags import (
    BACKGROUND,
    BACKGROUND_ALIASES,
    TagError,
    classes_from_tags,
    describe_classes,
    load_npy_dict,
    names_to_tags,
    parse_tags,
    split_tag_cell,
)

TAG_FILES = ("cls_labels.json", "cls_labels_onehot.npy", "cls_labels.npy")  # looked for in this order
_SPEC_FORMS = "voc:ROOT[:SPLIT], coco:ROOT[:SPLIT], folder:DIR[:LABELS_FILE]"
_Dirs = tuple[Path, Path | None, tuple[str, ...]]  # (image folder, mask folder, candidate mask stems)


class DatasetError(ValueError):
    """A dataset is missing files or has malformed/inconsistent metadata; the message names the file."""


@contextmanager
def _as_dataset_error() -> Iterator[None]:
    """Re-raise a :class:`~wsss.data.tags.TagError` as :class:`DatasetError` (same one-line message)."""
    try:
        yield
    except TagError as e:
        raise DatasetError(str(e)) from e


@dataclass
class Sample:
    """One decoded example."""

    id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray | None  # (K,) float32 multi-hot over classes 1..K (index k-1 <-> class k)
    mask: np.ndarray | None  # (H, W) uint8, 255 = ignore


class WSSSDataset:
    """Base reader: ``ids[i]`` has image ``image_path(i)``, optional mask and optional image-level labels.

    Labels come from a per-dataset table (``_table``) if it has the id, else from :meth:`_derive_labels`.
    """

    def __init__(
        self,
        classes: Sequence[str],
        ids: list[str],
        images: list[Path],
        masks: list[Path | None] | None = None,
        table: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.classes: tuple[str, ...] = tuple(classes)
        self.ids: list[str] = ids
        self._images = images
        self._masks = masks if masks is not None else [None] * len(ids)
        self._table = table or {}
        self.skipped: list[tuple[str, str]] = []  # (entry, reason) of what a reader found but cannot read as images

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes)

    @property
    def num_fg(self) -> int:
        """Number of foreground classes (length of a label vector)."""
        return len(self.classes) - 1

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        """Path of image ``i``."""
        return self._images[i]

    def mask_path(self, i: int) -> Path | None:
        """Path of the ground-truth mask of image ``i``, or None if there is none."""
        return self._masks[i]

    def labels(self, i: int) -> np.ndarray | None:
        """(K,) float32 multi-hot foreground labels of image ``i``, or None if unknown."""
        vec = self._table.get(self.ids[i])
        return vec.copy() if vec is not None else self._derive_labels(i)

    def _derive_labels(self, i: int) -> np.ndarray | None:
        """Fallback label source: the classes present in the mask."""
        path = self.mask_path(i)
        return None if path is None else labels_from_mask(self._read_mask(path), self.num_fg, path)

    def _read_mask(self, path: Path) -> np.ndarray:
        try:
            return read_label_png(path)
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"{path}: cannot read mask ({e})") from e

    def __getitem__(self, i: int) -> Sample:
        image = decode_image(self.image_path(i))
        mask_path = self.mask_path(i)
        mask = None if mask_path is None else self._read_mask(mask_path)
        if mask is not None and mask.shape != image.shape[:2]:
            raise DatasetError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {self.image_path(i)} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        if self.ids[i] in self._table or mask is None:
            labels = self.labels(i)
        else:  # reuse the decoded mask rather than reading it twice
            labels = labels_from_mask(mask, self.num_fg, mask_path)
        return Sample(id=self.ids[i], image=image, labels=labels, mask=mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_fg} foreground classes)"


# ----------------------------------------------------------------------------------------------------- label helpers


def check_classes(dataset: WSSSDataset, class_names: Sequence[str], owner: str = "the network") -> None:
    """Refuse a dataset whose classes (background first) are not ``owner``'s, naming the first difference."""
    ours, theirs = tuple(dataset.classes), tuple(class_names)
    if ours == theirs:
        return
    diff = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    raise DatasetError(f"dataset classes differ from {owner}'s: {len(ours)} vs {len(theirs)} classes, first "
                       f"difference at index {diff} ({_at(ours, diff)!r} vs {_at(theirs, diff)!r})")  # fmt: skip


def _at(names: tuple[str, ...], i: int) -> str | None:
    return names[i] if i < len(names) else None


def labels_from_mask(mask: np.ndarray, num_fg: int, where: str | Path = "mask") -> np.ndarray:
    """Multi-hot (num_fg,) float32 vector of the classes present in a mask (0 and 255 excluded)."""
    values = np.unique(mask)
    values = values[(values != 0) & (values != IGNORE_INDEX)]
    if values.size and values.max() > num_fg:
        raise DatasetError(f"{where}: mask value {int(values.max())} is not a class id (0..{num_fg} or 255)")
    vec = np.zeros(num_fg, dtype=np.float32)
    vec[values.astype(np.int64) - 1] = 1.0
    return vec


# ------------------------------------------------------------------------------------------------------ file readers


def read_classes_file(path: Path) -> tuple[str, ...]:
    """Class names, one per line, background first (blank lines skipped)."""
    names: list[str] = []
    for lineno, raw in enumerate(_read_text(path).splitlines(), 1):
        name = raw.strip()
        if not name:
            continue
        if name in names:
            raise DatasetError(f"{path}:{lineno}: duplicate class name {name!r}")
        names.append(name)
    if len(names) < 2:
        raise DatasetError(f"{path}: needs background plus at least one class, found {len(names)} name(s)")
    if names[0] not in BACKGROUND_ALIASES:
        raise DatasetError(f"{path}:1: first class must be the background (e.g. 'background'), got {names[0]!r}")
    return (BACKGROUND, *names[1:])


def read_split_file(path: Path) -> list[tuple[int, str]]:
    """(line number, id) pairs of a split list; a line's first token is the id, or a path whose stem is the id."""
    entries = []
    for lineno, raw in enumerate(_read_text(path).splitlines(), 1):
        tokens = raw.split()
        if tokens:
            token = tokens[0]
            entries.append((lineno, Path(token).stem if "/" in token else token))
    if not entries:
        raise DatasetError(f"{path}: split list is empty")
    return entries


def read_tag_file(path: Path, classes: Sequence[str], class_source: str) -> dict[str, np.ndarray]:
    """Image-level tags of a ``.json`` ({id: tags}) or ``.npy`` (pickled dict) file, in any form of :mod:`.tags`.

    Args:
        path: the tag file.
        classes: class names, background first.
        class_source: where ``classes`` came from, named in errors.

    Returns:
        {image id: (K,) float32 multi-hot}.
    """
    with _as_dataset_error():
        raw = load_npy_dict(path) if path.suffix.lower() == ".npy" else _read_json_object(path)
        return parse_tags(raw, classes, path, class_source)


def _read_json_object(path: Path) -> dict[str, object]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object {{image: [tags]}}, got {type(data).__name__}")
    return data


_UNSAFE_XML = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def read_voc_xml_names(path: Path) -> list[str]:
    """Object class names of a VOC annotation XML; DTDs/entities are refused (entity-expansion attacks)."""
    data = path.read_bytes()
    if _UNSAFE_XML.search(data):
        raise DatasetError(f"{path}: XML with DOCTYPE/ENTITY declarations is refused")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from e
    return [(obj.findtext("name") or "").strip() for obj in root.iter("object")]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing {what} folder")
    return path


def _list_dir(path: Path) -> set[str]:
    """File names in a folder (one syscall batch instead of one stat per image)."""
    with os.scandir(path) as it:
        return {e.name for e in it}


def _check_listed(missing: list[str], split_file: Path) -> None:
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatasetError(f"{split_file}: {len(missing)} listed image(s) missing: " + "; ".join(missing[:5]) + more)


def _label_table(root: Path, classes: Sequence[str], class_source: str) -> dict[str, np.ndarray]:
    """Image-level labels from the first of :data:`TAG_FILES` in ``root`` ({} if none)."""
    path = next((root / name for name in TAG_FILES if (root / name).is_file()), None)
    return {} if path is None else read_tag_file(path, classes, class_source)


# ------------------------------------------------------------------------------------------------------------ VOC


class VOCDataset(WSSSDataset):
    """PASCAL VOC 2012 (optionally with SBD's ``SegmentationClassAug``).

    Layout: ``JPEGImages/ID.jpg``, masks in ``SegmentationClassAug/`` if present else ``SegmentationClass/``,
    ids in ``ImageSets/Segmentation/SPLIT.txt`` (default ``train_aug`` if listed, else ``train``).
    Classes from ``classes.txt`` if present, else the 21 VOC classes. Tags: ``cls_labels.json`` ({id: names,
    indices or 0/1 vector}), else ``cls_labels_onehot.npy`` (SeCo), else ``cls_labels.npy`` (IRN); ids absent
    there fall back to the mask, then ``Annotations/ID.xml``.
    """

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        root = _require_dir(Path(root).expanduser(), "VOC root")
        img_dir = _require_dir(root / "JPEGImages", "JPEGImages")
        split_file = _voc_split_file(root, split)
        class_file = root / "classes.txt"
        classes = read_classes_file(class_file) if class_file.is_file() else VOC_CLASSES
        source = str(class_file) if class_file.is_file() else "the built-in VOC class list"
        mask_dir = next((d for d in (root / "SegmentationClassAug", root / "SegmentationClass") if d.is_dir()), None)
        ids, images, masks = _resolve(read_split_file(split_file), split_file, lambda id_: (img_dir, mask_dir, (id_,)))
        super().__init__(classes, ids, images, masks, _label_table(root, classes, source))
        self.root, self.split = root, split_file.stem
        self._xml_dir = root / "Annotations"

    def _derive_labels(self, i: int) -> np.ndarray | None:
        vec = super()._derive_labels(i)
        xml = self._xml_dir / f"{self.ids[i]}.xml"
        if vec is None and xml.is_file():
            with _as_dataset_error():
                vec = names_to_tags(read_voc_xml_names(xml), self.classes, str(xml))
        return vec


def _voc_split_file(root: Path, split: str | None) -> Path:
    sets = _require_dir(root / "ImageSets" / "Segmentation", "ImageSets/Segmentation")
    if split is None:
        split = "train_aug" if (sets / "train_aug.txt").is_file() else "train"
    path = sets / f"{split}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in sets.glob("*.txt"))) or "none"
        raise DatasetError(f"{path}: missing split list for split {split!r} (available: {known})")
    return path


def _resolve(
    entries: list[tuple[int, str]], split_file: Path, dirs_for: Callable[[str], _Dirs]
) -> tuple[list[str], list[Path], list[Path | None]]:
    """Check each listed id has ``ID.jpg``; find its mask (first existing ``STEM.png`` of the candidate stems)."""
    listings: dict[Path, set[str]] = {}

    def has(folder: Path, name: str) -> bool:
        if folder not in listings:
            listings[folder] = _list_dir(folder)
        return name in listings[folder]

    ids, images, masks, missing = [], [], [], []
    for lineno, id_ in entries:
        img_dir, mask_dir, stems = dirs_for(id_)
        if not has(img_dir, f"{id_}.jpg"):
            missing.append(f"line {lineno}: {img_dir / f'{id_}.jpg'}")
            continue
        ids.append(id_)
        images.append(img_dir / f"{id_}.jpg")
        names = [f"{s}.png" for s in stems] if mask_dir is not None else []
        masks.append(next((mask_dir / n for n in names if has(mask_dir, n)), None))
    _check_listed(missing, split_file)
    return ids, images, masks


# ----------------------------------------------------------------------------------------------------------- COCO

_COCO_ID = re.compile(r"^COCO_([a-z]+)(\d{4})_(\w+)$")


class COCODataset(WSSSDataset):
    """COCO 2014 in the VOC-style layout of the official SeCo code.

    Layout: ``JPEGImages/{train2014,val2014}/COCO_train2014_000000000009.jpg`` (folders named ``train``/``val``
    work too), masks ``SegmentationClass/{train2014,val2014}/000000000009.png`` (the id without its
    ``COCO_<set><year>_`` prefix, as SeCo strips it; a mask named by the full id is accepted too).
    Id list ``SPLIT.txt`` in ``list_dir`` (default: ``root``, else ``root/ImageSets``), e.g. SeCo's
    ``datasets/coco/{train,val,val_part}.txt``. Tags: the first of :data:`TAG_FILES` in the list folder or root,
    else the mask. Ids without the prefix use the split name to pick the folder.
    """

    def __init__(self, root: str | Path, split: str = "train", list_dir: str | Path | None = None) -> None:
        root = _require_dir(Path(root).expanduser(), "COCO root")
        img_root = _require_dir(root / "JPEGImages", "JPEGImages")
        split_file = _coco_split_file(root, split, list_dir)
        dirs_for = _coco_folders(img_root, root / "SegmentationClass", "val" if split.startswith("val") else "train")
        ids, images, masks = _resolve(read_split_file(split_file), split_file, dirs_for)
        label_root = split_file.parent if _has_label_file(split_file.parent) else root
        super().__init__(COCO_CLASSES, ids, images, masks, _label_table(label_root, COCO_CLASSES, "COCO_CLASSES"))
        self.root, self.split = root, split


def _coco_split_file(root: Path, split: str, list_dir: str | Path | None) -> Path:
    dirs = [Path(list_dir).expanduser()] if list_dir is not None else [root, root / "ImageSets"]
    found = next((d / f"{split}.txt" for d in dirs if (d / f"{split}.txt").is_file()), None)
    if found is None:
        tried = ", ".join(str(d / f"{split}.txt") for d in dirs)
        raise DatasetError(f"missing COCO split list for split {split!r} (tried {tried})")
    return found


def _coco_folders(img_root: Path, mask_root: Path, default_subset: str) -> Callable[[str], _Dirs]:
    """id -> (image folder, mask folder, mask stems); the folder comes from the id's ``COCO_<set><year>_`` prefix."""
    cache: dict[str, tuple[Path, Path | None]] = {}

    def dirs_for(id_: str) -> _Dirs:
        m = _COCO_ID.match(id_)
        subset, year, stem = m.groups() if m else (default_subset, "2014", id_)
        names = (subset + year, subset)
        if names[0] not in cache:
            img_dir = _first_dir(img_root, names)
            if img_dir is None:
                raise DatasetError(f"{img_root}: missing image folder for {id_!r} (expected {' or '.join(names)})")
            cache[names[0]] = img_dir, _first_dir(mask_root, names)
        return (*cache[names[0]], (stem, id_))

    return dirs_for


def _first_dir(parent: Path, names: Sequence[str]) -> Path | None:
    return next((parent / n for n in names if (parent / n).is_dir()), None)


def _has_label_file(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TAG_FILES)


# --------------------------------------------------------------------------------------------------------- folder


class FolderDataset(WSSSDataset):
    """A folder of images as it is, subfolders walked (sorted; hidden files and folders skipped) with optional
    labels.

    Ids are unique by construction: the path relative to the folder, ``/``-separated, without its extension
    (``sub/cat.jpg`` -> ``sub/cat``), keeping the extension where two files would share an id (``a.jpg`` and
    ``a.png`` -> ``a.jpg`` and ``a.png``). Entries that cannot be images (a dangling link, a folder link, a file
    without an image extension, a special file) are kept in :attr:`skipped` as (relative path, reason); a folder
    named like an image is walked like any folder and listed there too. Undecodable files fail when read.

    ``labels_file`` is CSV (header ``image,labels``; tags separated by ``;`` or ``|``, numbers also by spaces) or
    JSON (``{image: [tags]}``); ``image`` is an id or a relative path with its extension (for a top-level image:
    its file name, or its stem where no other file shares it); tags are names, class indices or 0/1 vectors
    (:mod:`wsss.data.tags`). Images without an entry get labels None. Without ``classes``, the classes are
    background + the sorted union of names in the labels file (indices and vectors need ``classes``).
    """

    def __init__(
        self, dir: str | Path, labels_file: str | Path | None = None, classes: Sequence[str] | None = None
    ) -> None:
        folder = _require_dir(Path(dir).expanduser(), "image")
        images, skipped = _scan_images(folder)
        ids = folder_ids(folder, images)
        if classes is not None and not classes:
            raise DatasetError("classes must include the background at index 0")
        if labels_file is None:
            classes, table = classes or (BACKGROUND,), {}
        else:
            classes, table = _folder_tags(Path(labels_file).expanduser(), folder, images, ids, classes)
        super().__init__(classes, ids, images, None, table)
        self.root, self.skipped = folder, skipped

    def _derive_labels(self, i: int) -> np.ndarray | None:
        return None


def _folder_tags(
    path: Path, folder: Path, images: list[Path], ids: list[str], classes: Sequence[str] | None
) -> tuple[Sequence[str], dict[str, np.ndarray]]:
    """(classes, tag table) of a folder's labels file; classes default to the names the file uses."""
    raw = _read_folder_labels(path, folder, images, ids)
    with _as_dataset_error():
        classes = classes_from_tags(raw, path) if classes is None else classes
        return classes, parse_tags(raw, classes, path, "the given classes")


def _relative(folder: Path, path: Path) -> str:
    return path.relative_to(folder).as_posix()


def folder_ids(folder: Path, images: list[Path]) -> list[str]:
    """Unique ids of ``images`` (files under ``folder``): relative paths without extension, the extension kept
    wherever ids would coincide (repeated until none do; relative paths themselves are unique)."""
    full = [_relative(folder, p) for p in images]
    ids = [f[: len(f) - len(p.suffix)] for f, p in zip(full, images, strict=True)]
    while clashes := [i for i, n in enumerate(Counter(ids)[x] for x in ids) if n > 1 and ids[i] != full[i]]:
        for i in clashes:
            ids[i] = full[i]
    return ids


def _scan_images(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files under ``folder``, sorted; (relative path, reason) of every other non-hidden entry)."""
    images: list[Path] = []
    skipped: list[tuple[str, str]] = []

    def unlisted(err: OSError) -> None:
        skipped.append((_relative(folder, Path(err.filename)), f"cannot list folder ({err.strerror or err})"))

    for top, dirs, files in os.walk(folder, onerror=unlisted):
        here = Path(top)
        linked = sorted(d for d in dirs if not d.startswith(".") and (here / d).is_symlink())
        skipped += [(_relative(folder, here / d), "a link to a folder, not followed") for d in linked]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in linked)
        for name in [d for d in dirs if Path(d).suffix.lower() in IMAGE_EXTENSIONS]:
            skipped.append((_relative(folder, here / name), "a folder, not an image file (walked as a subfolder)"))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = here / name
            reason = _not_an_image(path)
            if reason is None:
                images.append(path)
            else:
                skipped.append((_relative(folder, path), reason))
    if not images:
        raise DatasetError(f"{folder}: no images found (extensions: {' '.join(IMAGE_EXTENSIONS)}; "
                           f"{len(skipped)} other entries)")  # fmt: skip
    images.sort(key=lambda p: p.relative_to(folder).parts)
    skipped.sort()
    return images, skipped


def _not_an_image(path: Path) -> str | None:
    """Why a directory entry cannot be an image file (None: it may be one; decoding tells)."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file name (extension {path.suffix or 'none'!r}; read: {' '.join(IMAGE_EXTENSIONS)})"
    if path.is_symlink() and not path.exists():
        return f"a dangling link (to {os.readlink(path)})"
    try:
        mode = path.stat().st_mode
    except OSError as e:
        return f"cannot stat ({e.strerror or e})"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _read_folder_labels(path: Path, folder: Path, images: list[Path], ids: list[str]) -> dict[str, object]:
    """{id: tags} from a CSV or JSON labels file, checking each entry names exactly one existing image."""
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv_labels(path)
    elif suffix == ".json":
        rows = _read_json_rows(path)
    else:
        raise DatasetError(f"{path}: labels file must be .csv or .json, got {suffix or 'no extension'!r}")
    by_key = {**{_relative(folder, p): id_ for p, id_ in zip(images, ids, strict=True)}, **{i: i for i in ids}}
    stems: dict[str, list[str]] = {}
    for p in images:
        stems.setdefault(_relative(folder, p.with_suffix("")), []).append(_relative(folder, p))
    out: dict[str, object] = {}
    for where, key, names in rows:
        id_ = by_key.get(key)
        if id_ is None and len(stems.get(key, [])) > 1:
            raise DatasetError(f"{path}:{where}: {key!r} names {len(stems[key])} images "
                               f"({', '.join(stems[key])}): give the file name")  # fmt: skip
        if id_ is None:
            raise DatasetError(f"{path}:{where}: entry for non-existent image {key!r}")
        if id_ in out:
            raise DatasetError(f"{path}:{where}: duplicate entry for image {id_!r}")
        out[id_] = names
    return out


def _read_csv_labels(path: Path) -> list[tuple[str, str, object]]:
    rows = list(csv.reader(_read_text(path).splitlines()))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if header != ["image", "labels"]:
        raise DatasetError(f"{path}:1: CSV header must be 'image,labels', got {','.join(rows[0]) if rows else ''!r}")
    out = []
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DatasetError(f"{path}:{lineno}: expected 2 columns (image,labels), got {len(row)}")
        out.append((f"line {lineno}", row[0].strip(), split_tag_cell(row[1])))
    return out


def _read_json_rows(path: Path) -> list[tuple[str, str, object]]:
    return [(f"entry {key!r}", key, tags) for key, tags in _read_json_object(path).items()]


# ----------------------------------------------------------------------------------------------------------- spec


def parse_data_spec(spec: str, classes: Sequence[str] | None = None) -> WSSSDataset:
    """Build a dataset from ``voc:ROOT[:SPLIT]``, ``coco:ROOT[:SPLIT]`` or ``folder:DIR[:LABELS_FILE]``.

    ``classes`` (incl. background) sets a folder dataset's classes; for VOC/COCO it must match the dataset's.
    """
    kind, *rest = spec.split(":", 2)
    kind = kind.strip().lower()
    path = rest[0] if rest else ""
    extra = rest[1] if len(rest) > 1 and rest[1] else None
    if kind not in ("voc", "coco", "folder"):
        raise DatasetError(f"unknown dataset spec {spec!r}: expected one of {_SPEC_FORMS}")
    if not path:
        raise DatasetError(f"dataset spec {spec!r} names no path: expected one of {_SPEC_FORMS}")
    if kind == "folder":
        return FolderDataset(path, extra, classes)
    ds = VOCDataset(path, extra) if kind == "voc" else COCODataset(path, extra or "train")
    if classes is not None and tuple(classes) != ds.classes:
        raise DatasetError(
            f"dataset {spec!r} has {ds.num_classes} classes ({describe_classes(ds.classes)}), which differ from the "
            f"{len(classes)} requested ({describe_classes(classes)})"
        )
    return ds
