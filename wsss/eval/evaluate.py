"""Evaluate a folder of predicted label PNGs against ground truth: a folder of label PNGs, or a dataset's own masks."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsss.data.datasets import WSSSDataset
from wsss.data.palette import IGNORE_INDEX, read_label_png
from wsss.eval.metrics import ConfusionMatrix, ContextFalseActivation, PredIgnore, Reduction

CONTEXT_DIR = "ContextMask"  # a dataset root's context masks (wsss data synth writes them)


def _list_ids(folder: Path) -> list[str]:
    """Sorted ids of the PNGs under ``folder``: relative paths without ``.png`` (subfolders walked, as folder
    inputs' ids such as ``sub/name`` are written)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    return sorted(p.relative_to(folder).as_posix()[: -len(".png")] for p in folder.rglob("*.png") if p.is_file())


def list_predictions(pred_dir: str | Path) -> list[str]:
    """Ids of the label PNGs in ``pred_dir`` (for scoring only the images that have a prediction)."""
    return _list_ids(Path(pred_dir))


def _check_gt(image_id: str, gt: np.ndarray, num_classes: int) -> None:
    """Raise if the ground truth holds ids outside [0, C) other than the ignore index."""
    bad = (gt >= num_classes) & (gt != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"{image_id}: ground truth has ids {np.unique(gt[bad]).tolist()} outside [0, {num_classes})")


def _read_matching(path: Path, image_id: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Read a label PNG that must have the ground truth's shape."""
    label = read_label_png(path)
    if label.shape != shape:
        raise ValueError(f"{image_id}: {what} shape {label.shape} does not match ground truth shape {shape}")
    return label


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    class_names: Sequence[str],
    context_dir: str | Path | None = None,
    reduction: Reduction = "nanmean_present",
    pred_ignore: PredIgnore = "error",
    allow_missing: bool = False,
    ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score ``pred_dir/<id>.png`` against ``gt_dir/<id>.png`` for every ground-truth id (or the given ``ids``).

    Args:
        pred_dir: Folder of predicted label PNGs.
        gt_dir: Folder of ground-truth label PNGs (255 = ignore).
        class_names: Names of the C classes, background first.
        context_dir: Optional folder of context masks (``<id>.png``) for the context false-activation figure.
        reduction: mIoU reduction, see ``ConfusionMatrix.compute``.
        pred_ignore: Treatment of predicted 255, see ``ConfusionMatrix``.
        allow_missing: Skip ids without a prediction instead of raising.
        ids: Image ids to evaluate; defaults to all PNG ids under ``gt_dir``.

    Returns:
        The ``compute`` dict plus class_names, num_images, missing (ids without a prediction) and, with
        ``context_dir``, context_false_activation.

    Raises:
        FileNotFoundError: For missing predictions (unless ``allow_missing``) or context masks.
        ValueError: On shape mismatches, ground-truth ids outside [0, C) other than 255, or invalid predictions.
    """
    gt_dir = Path(gt_dir)
    ids = _list_ids(gt_dir) if ids is None else list(ids)
    pairs = {i: gt_dir / f"{i}.png" for i in ids}
    return score_pairs(pred_dir, pairs, class_names, context_dir, reduction, pred_ignore, allow_missing)


def evaluate_dataset(
    pred_dir: str | Path,
    data: WSSSDataset,
    context_dir: str | Path | None = None,
    reduction: Reduction = "nanmean_present",
    pred_ignore: PredIgnore = "error",
    allow_missing: bool = False,
    ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score ``pred_dir/<id>.png`` for exactly the ids of ``data`` (e.g. ``parse_data_spec("voc:ROOT:val")``, or
    the given subset ``ids``) against its own masks, with its classes; as :func:`evaluate_folders` otherwise.

    Raises:
        ValueError: The dataset has no mask for some of those ids (named), or an id is not the dataset's.
    """
    index = {id_: i for i, id_ in enumerate(data.ids)}
    ids = data.ids if ids is None else list(ids)
    unknown = [i for i in ids if i not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} id(s) are not in {data!r}: {', '.join(unknown[:5])}")
    pairs = {i: data.mask_path(index[i]) for i in ids}
    no_mask = [i for i, path in pairs.items() if path is None]
    if no_mask:
        shown = ", ".join(no_mask[:5]) + (", ..." if len(no_mask) > 5 else "")
        raise ValueError(f"{len(no_mask)} of {len(ids)} images of {data!r} have no ground-truth mask: {shown}")
    return score_pairs(pred_dir, pairs, data.classes, context_dir, reduction, pred_ignore, allow_missing)


def dataset_context_dir(data: WSSSDataset) -> Path | None:
    """The dataset's context-mask folder (``ROOT/ContextMask``, the synthetic benchmark's), None if it has none."""
    root = getattr(data, "root", None)
    folder = None if root is None else Path(root) / CONTEXT_DIR
    return folder if folder is not None and folder.is_dir() else None


def score_pairs(
    pred_dir: str | Path,
    gt_paths: dict[str, Path],
    class_names: Sequence[str],
    context_dir: str | Path | None = None,
    reduction: Reduction = "nanmean_present",
    pred_ignore: PredIgnore = "error",
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Score ``pred_dir/<id>.png`` against each ``gt_paths[id]``; see :func:`evaluate_folders`."""
    pred_dir = Path(pred_dir)
    ids = list(gt_paths)
    missing = [i for i in ids if not (pred_dir / f"{i}.png").is_file()]
    if missing and not allow_missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(ids)} predictions missing in {pred_dir}: {shown}")
    num_classes = len(class_names)
    cm = ConfusionMatrix(num_classes, IGNORE_INDEX, pred_ignore)
    ctx = ContextFalseActivation() if context_dir is not None else None
    skip = set(missing)
    done = [i for i in ids if i not in skip]
    for image_id in done:
        gt = read_label_png(gt_paths[image_id])
        _check_gt(image_id, gt, num_classes)
        pred = _read_matching(pred_dir / f"{image_id}.png", image_id, gt.shape, "prediction")
        try:
            cm.update(pred, gt)
        except ValueError as err:
            raise ValueError(f"{image_id}: {err}") from None
        if ctx is not None:
            ctx.update(pred, _read_matching(Path(context_dir) / f"{image_id}.png", image_id, gt.shape, "context"))
    result = cm.compute(reduction)
    result.update(class_names=list(class_names), num_images=len(done), missing=missing)
    if ctx is not None:
        result["context_false_activation"] = ctx.compute()
    return result


def _json_safe(obj: Any) -> Any:
    """Recursively convert numpy types to Python ones and non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write an evaluation result as strict JSON (NaN / inf become null), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")


def label_agreement(dir_a: str | Path, dir_b: str | Path, ids: Sequence[str]) -> dict[str, Any]:
    """How far two folders of label PNGs agree over ``ids``: the share of equal pixels and of identical files."""
    equal = total = same_files = 0
    for image_id in ids:
        a, b = read_label_png(Path(dir_a) / f"{image_id}.png"), read_label_png(Path(dir_b) / f"{image_id}.png")
        if a.shape != b.shape:
            raise ValueError(f"{image_id}: label shapes differ, {a.shape} in {dir_a} and {b.shape} in {dir_b}")
        same = int((a == b).sum())
        equal, total, same_files = equal + same, total + a.size, same_files + (same == a.size)
    return {"images": len(ids), "identical_images": same_files, "pixel_agreement": equal / max(total, 1)}
