"""Segmentation metrics: a streaming confusion matrix (mIoU and friends) and context false activation.

Both accumulators take numpy arrays or torch tensors of any shape. The torch path stays on the tensors' device
and does not synchronise with the host until ``compute``; invalid predictions found there are counted on the
device and reported by ``compute`` instead of at ``update``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from wsss.data.palette import IGNORE_INDEX

ArrayLike = np.ndarray | torch.Tensor
Reduction = Literal["nanmean_present", "nanmean", "mean_all"]
PredIgnore = Literal["error", "background", "exclude"]
REDUCTIONS = ("nanmean_present", "nanmean", "mean_all")
PRED_IGNORE_MODES = ("error", "background", "exclude")


def _check_integer(name: str, a: ArrayLike) -> None:
    """Raise a TypeError unless ``a`` holds integers or booleans."""
    ok = not (a.is_floating_point() or a.is_complex()) if isinstance(a, torch.Tensor) else a.dtype.kind in "iub"
    if not ok:
        raise TypeError(f"{name} must hold integer class ids, got dtype {a.dtype}")


def _as_pair(a: Any, b: Any, device: torch.device | None) -> tuple[ArrayLike, ArrayLike]:
    """Bring two label arrays to one backend: torch if either is a tensor or ``device`` is set, else numpy."""
    if device is None and not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        a, b = np.asarray(a), np.asarray(b)
    else:
        if device is None:
            device = (a if isinstance(a, torch.Tensor) else b).device
        a, b = (torch.as_tensor(x).to(device) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def _flat_int64(a: ArrayLike) -> ArrayLike:
    """Flatten to int64 (so that ``id * C`` cannot overflow a uint8)."""
    if isinstance(a, torch.Tensor):
        return a.reshape(-1).to(torch.int64)
    return a.reshape(-1).astype(np.int64, copy=False)


def _bincount(idx: ArrayLike, size: int) -> ArrayLike:
    """Counts of ``idx`` in bins 0..size-1; bin ``size`` is a trash bin for masked entries (dropped)."""
    if isinstance(idx, np.ndarray):
        return np.bincount(idx, minlength=size + 1)[:size]
    if idx.device.type == "cpu":
        return torch.bincount(idx, minlength=size + 1)[:size]
    # CUDA bincount syncs to size its output; scatter_add into a fixed-size buffer does not.
    out = torch.zeros(size + 1, dtype=torch.int64, device=idx.device)
    return out.scatter_add_(0, idx, torch.ones_like(idx))[:size]


def _to_numpy(a: ArrayLike) -> np.ndarray:
    """Host copy of an accumulator."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _on_device(a: ArrayLike, device: torch.device) -> torch.Tensor:
    """An accumulator as a tensor on ``device``; zeros are created there (a host copy would sync)."""
    if isinstance(a, np.ndarray) and not a.any():
        return torch.zeros(a.shape, dtype=torch.int64, device=device)
    return torch.as_tensor(a).to(device)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den as float64, NaN where den == 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den != 0)


def _mean(x: np.ndarray) -> float:
    """Mean that returns NaN (without a warning) for an empty selection."""
    return float(x.mean()) if x.size else float("nan")


class ConfusionMatrix:
    """Streaming C x C confusion matrix: ``H[t, p]`` counts pixels with ground truth t and prediction p.

    Only pixels with ``0 <= gt < num_classes`` (and ``gt != ignore_index``) are counted. Predictions at counted
    pixels must lie in [0, num_classes); a prediction equal to ``ignore_index`` is handled by ``pred_ignore``:

    - ``"error"``: it is invalid like any other out-of-range prediction (ValueError).
    - ``"background"``: it is mapped to class 0, as IRN does for its pseudo labels.
    - ``"exclude"``: the pixel is not counted (SeCo's ``pseudo_scores``: gt set to ignore where pred is ignore).

    Args:
        num_classes: Number of classes C, background (0) included.
        ignore_index: Ground-truth id that is never counted.
        pred_ignore: How predictions equal to ``ignore_index`` are treated.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, pred_ignore: PredIgnore = "error") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if pred_ignore not in PRED_IGNORE_MODES:
            raise ValueError(f"pred_ignore must be one of {PRED_IGNORE_MODES}, got {pred_ignore!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.pred_ignore = pred_ignore
        self.reset()

    def reset(self) -> None:
        """Zero the counts (the accumulator returns to numpy on the host)."""
        self._hist: ArrayLike = np.zeros(self.num_classes**2, dtype=np.int64)
        self._invalid: ArrayLike = np.zeros((), dtype=np.int64)

    @property
    def device(self) -> torch.device | None:
        """Device of the torch accumulator, or None while it is a numpy array."""
        return self._hist.device if isinstance(self._hist, torch.Tensor) else None

    @property
    def matrix(self) -> np.ndarray:
        """The (C, C) int64 confusion matrix on the host (rows: ground truth, columns: prediction)."""
        return _to_numpy(self._hist).reshape(self.num_classes, self.num_classes).copy()

    def _to_torch(self, device: torch.device) -> None:
        """Move the accumulators to ``device`` as tensors."""
        self._hist = _on_device(self._hist, device)
        self._invalid = _on_device(self._invalid, device)

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add one prediction / ground-truth pair of equal shape (any number of dimensions).

        Raises:
            ValueError: On a shape mismatch, or (numpy inputs) when a counted pixel has an invalid prediction.
            TypeError: For non-integer inputs.
        """
        pred, gt = _as_pair(pred, gt, self.device)
        _check_integer("pred", pred)
        _check_integer("gt", gt)
        if isinstance(pred, torch.Tensor) and self.device is None:
            self._to_torch(pred.device)
        pred, gt = _flat_int64(pred), _flat_int64(gt)
        where = torch.where if isinstance(pred, torch.Tensor) else np.where
        c, ig = self.num_classes, self.ignore_index
        counted = (gt >= 0) & (gt < c) & (gt != ig)
        if self.pred_ignore == "background":
            pred = where(pred == ig, 0, pred)
        elif self.pred_ignore == "exclude":
            counted = counted & (pred != ig)
        bad = counted & ((pred < 0) | (pred >= c))
        if isinstance(bad, np.ndarray) and bad.any():
            raise ValueError(self._invalid_message(int(bad.sum()), np.unique(pred[bad])))
        self._invalid = self._invalid + bad.sum()
        idx = where(counted & ~bad, gt * c + pred, c * c)
        self._hist = self._hist + _bincount(idx, c * c)

    def _invalid_message(self, n: int, values: np.ndarray | None = None) -> str:
        """Error text for predictions outside [0, C)."""
        shown = "" if values is None else f" (values {values[:10].tolist()})"
        hint = (
            " Use pred_ignore='background' or 'exclude' for ignore predictions." if self.pred_ignore == "error" else ""
        )
        return f"{n} counted pixels have predictions outside [0, {self.num_classes}){shown}.{hint}"

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add the counts of ``other`` into this matrix in place; returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge confusion matrices with different num_classes or ignore_index")
        device = self.device or other.device
        if device is not None:
            self._to_torch(device)
            self._hist = self._hist + _on_device(other._hist, device)
            self._invalid = self._invalid + _on_device(other._invalid, device)
        else:
            self._hist = self._hist + other._hist
            self._invalid = self._invalid + other._invalid
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.ignore_index, self.pred_ignore)
        return out.merge(self).merge(other)

    def compute(self, reduction: Reduction = "nanmean_present") -> dict[str, Any]:
        """Metrics from the accumulated counts (one host sync for torch accumulators).

        Args:
            reduction: How per-class IoUs become mIoU: ``"nanmean_present"`` averages over classes present in
                the ground truth; ``"nanmean"`` over classes in the ground truth or the prediction (chainercv,
                ToCo); ``"mean_all"`` over all C classes, absent ones counting 0 (SEAM).

        Returns:
            miou, pixel_acc, mean_acc (floats); iou, precision, recall, fp_over_tp, fn_over_tp (per-class lists,
            NaN where undefined); present (per-class bools: class occurs in the ground truth); confusion (C x C
            nested list); num_classes, reduction, pixels (number of counted pixels).

        Raises:
            ValueError: If any counted pixel had an invalid prediction.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        invalid = int(_to_numpy(self._invalid))
        if invalid:
            raise ValueError(self._invalid_message(invalid))
        hist = self.matrix
        tp, rows, cols = np.diag(hist), hist.sum(1), hist.sum(0)
        iou = _safe_div(tp, rows + cols - tp)
        present = rows > 0
        recall = _safe_div(tp, rows)
        if reduction == "nanmean_present":
            miou = _mean(iou[present])
        elif reduction == "nanmean":
            miou = _mean(iou[~np.isnan(iou)])
        else:
            miou = float(np.nan_to_num(iou, nan=0.0).mean())
        return {
            "miou": miou,
            "iou": iou.tolist(),
            "precision": _safe_div(tp, cols).tolist(),
            "recall": recall.tolist(),
            "pixel_acc": float(_safe_div(tp.sum(), hist.sum())),
            "mean_acc": _mean(recall[present]),
            "fp_over_tp": _safe_div(cols - tp, tp).tolist(),
            "fn_over_tp": _safe_div(rows - tp, tp).tolist(),
            "present": present.tolist(),
            "confusion": hist.tolist(),
            "num_classes": self.num_classes,
            "reduction": reduction,
            "pixels": int(hist.sum()),
        }

    def table(self, class_names: Sequence[str], reduction: Reduction = "nanmean_present") -> str:
        """Per-class IoU / precision / recall table in %, followed by mIoU and pixel accuracy rows."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        return format_table(self.compute(reduction), class_names)


def format_table(result: dict[str, Any], class_names: Sequence[str]) -> str:
    """Render a ``ConfusionMatrix.compute`` result as a plain-text table (values in %, "-" if undefined)."""

    def pct(v: float) -> str:
        return "-" if v is None or np.isnan(v) else f"{100 * v:.2f}"

    width = max(12, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}} {'IoU':>7} {'Prec':>7} {'Recall':>7}", "-" * (width + 24)]
    for name, i, p, r in zip(class_names, result["iou"], result["precision"], result["recall"], strict=True):
        lines.append(f"{name:<{width}} {pct(i):>7} {pct(p):>7} {pct(r):>7}")
    lines.append("-" * (width + 24))
    lines.append(f"{'mIoU':<{width}} {pct(result['miou']):>7}")
    lines.append(f"{'pixel acc':<{width}} {pct(result['pixel_acc']):>7}")
    return "\n".join(lines)


class ContextFalseActivation:
    """Share of context pixels (e.g. water next to a boat) predicted as their co-occurring foreground class.

    The context mask holds 0 where there is no context and the foreground class id v > 0 in the context region
    belonging to class v. A pixel is a false activation when ``pred == context`` there.

    Args:
        max_id: Largest context id accepted (255 for uint8 masks).
    """

    def __init__(self, max_id: int = 255) -> None:
        self.max_id = max_id
        self.reset()

    def reset(self) -> None:
        """Zero the counts."""
        self._total: ArrayLike = np.zeros(self.max_id + 1, dtype=np.int64)
        self._hits: ArrayLike = np.zeros(self.max_id + 1, dtype=np.int64)
        self._invalid: ArrayLike = np.zeros((), dtype=np.int64)

    def update(self, pred: ArrayLike, context: ArrayLike) -> None:
        """Add one prediction and its context mask (equal shapes; numpy or torch)."""
        device = self._total.device if isinstance(self._total, torch.Tensor) else None
        pred, context = _as_pair(pred, context, device)
        _check_integer("pred", pred)
        _check_integer("context", context)
        if isinstance(pred, torch.Tensor) and device is None:
            self._total, self._hits, self._invalid = (_on_device(a, pred.device) for a in self.state)
        pred, context = _flat_int64(pred), _flat_int64(context)
        where = torch.where if isinstance(pred, torch.Tensor) else np.where
        bad = (context < 0) | (context > self.max_id)
        if isinstance(bad, np.ndarray) and bad.any():
            raise ValueError(f"context ids must lie in [0, {self.max_id}], got {np.unique(context[bad])[:10]}")
        self._invalid = self._invalid + bad.sum()
        size = self.max_id + 1
        ctx = where(bad, size, context)
        self._total = self._total + _bincount(ctx, size)
        self._hits = self._hits + _bincount(where(pred == ctx, ctx, size), size)

    @property
    def state(self) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
        """The raw accumulators (total per id, hits per id, invalid count)."""
        return self._total, self._hits, self._invalid

    def merge(self, other: ContextFalseActivation) -> ContextFalseActivation:
        """Add the counts of ``other`` in place (on the host); returns self."""
        if other.max_id != self.max_id:
            raise ValueError("cannot merge accumulators with different max_id")
        self._total, self._hits, self._invalid = (
            _to_numpy(a) + _to_numpy(b) for a, b in zip(self.state, other.state, strict=True)
        )
        return self

    def compute(self) -> dict[str, Any]:
        """Returns overall (rate over all context pixels, NaN if none), per_class ({id: rate}) and pixels."""
        total, hits, invalid = (_to_numpy(a) for a in self.state)
        if int(invalid):
            raise ValueError(f"{int(invalid)} context pixels have ids outside [0, {self.max_id}]")
        total, hits = total[1:], hits[1:]  # id 0 = no context
        ids = np.flatnonzero(total) + 1
        per_class = {int(i): float(hits[i - 1] / total[i - 1]) for i in ids}
        return {
            "overall": float(_safe_div(hits.sum(), total.sum())),
            "per_class": per_class,
            "pixels": int(total.sum()),
        }


def context_false_activation(pred: ArrayLike, context_mask: ArrayLike, context_class: int | None = None) -> float:
    """Context false-activation rate of one image (NaN if it has no context pixels).

    Args:
        pred: Predicted label map.
        context_mask: 0 = no context, v > 0 = context of class v.
        context_class: If given, every context pixel (mask > 0) is scored against this class instead.
    """
    if context_class is not None:
        if isinstance(context_mask, torch.Tensor):
            context_mask = torch.where(context_mask > 0, context_class, 0)
        else:
            context_mask = np.where(np.asarray(context_mask) > 0, context_class, 0)
    acc = ContextFalseActivation()
    acc.update(pred, context_mask)
    return acc.compute()["overall"]
