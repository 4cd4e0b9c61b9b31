"""Tests for wsss.eval.metrics and wsss.eval.evaluate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wsss.data.palette import save_label_png
from wsss.eval.evaluate import evaluate_folders, write_json
from wsss.eval.metrics import ConfusionMatrix, ContextFalseActivation, context_false_activation

# Hand example: 3 classes, the last pixel ignored. Confusion (rows gt, cols pred) worked out by hand:
#   gt 0: pred 0 x2, pred 1 x1, pred 2 x1     -> [2, 1, 1]
#   gt 1: pred 0 x1, pred 1 x2                -> [1, 2, 0]
#   gt 2: pred 1 x1, pred 2 x1                -> [0, 1, 1]
GT = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 255], dtype=np.uint8)
PRED = np.array([0, 0, 1, 2, 1, 1, 0, 2, 1, 2], dtype=np.uint8)


def test_hand_computed_example() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    np.testing.assert_array_equal(cm.matrix, [[2, 1, 1], [1, 2, 0], [0, 1, 1]])
    r = cm.compute()
    # rows 4,3,2; cols 3,4,2; diag 2,2,1 -> IoU 2/5, 2/5, 1/3; mIoU 17/45
    np.testing.assert_allclose(r["iou"], [0.4, 0.4, 1 / 3])
    assert r["miou"] == pytest.approx(17 / 45)
    assert r["pixel_acc"] == pytest.approx(5 / 9)
    np.testing.assert_allclose(r["precision"], [2 / 3, 1 / 2, 1 / 2])
    np.testing.assert_allclose(r["recall"], [1 / 2, 2 / 3, 1 / 2])
    assert r["mean_acc"] == pytest.approx(5 / 9)
    np.testing.assert_allclose(r["fp_over_tp"], [0.5, 1.0, 1.0])
    assert r["present"] == [True, True, True]
    assert r["pixels"] == 9


def _random_pairs(seed: int, c: int, n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        gt = rng.integers(0, c, size=(17, 23))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt % 255, rng.integers(0, c, size=gt.shape))
        pred = np.where(pred == 255, 0, pred)
        pairs.append((pred.astype(np.uint8), gt.astype(np.uint8)))
    return pairs


def _miou_confusion_add_at(pairs: list, c: int) -> float:
    """ToCo/SeCo style: one confusion matrix, then diag / (row + col - diag), nanmean."""
    hist = np.zeros((c, c), dtype=np.int64)
    for pred, gt in pairs:
        m = gt < c
        np.add.at(hist, (gt[m].astype(int), pred[m].astype(int)), 1)
    d = np.diag(hist)
    return float(np.nanmean(d / (hist.sum(0) + hist.sum(1) - d)))


def _miou_chainercv_like(pairs: list, c: int) -> float:
    """chainercv style: bincount of c * gt + pred per image, IoU = diag / (sum0 + sum1 - diag)."""
    conf = np.zeros((c, c), dtype=np.int64)
    for pred, gt in pairs:
        g, p = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
        keep = g >= 0
        keep &= g < c
        conf += np.bincount(c * g[keep] + p[keep], minlength=c * c).reshape(c, c)
    iou = np.diag(conf) / (conf.sum(axis=1) + conf.sum(axis=0) - np.diag(conf))
    return float(np.nanmean(iou))


def _miou_seam_like(pairs: list, c: int) -> float:
    """SEAM style: per-class T (gt), P (pred), TP counts over valid pixels, IoU = TP / (T + P - TP)."""
    t, p, tp = np.zeros(c), np.zeros(c), np.zeros(c)
    for pred, gt in pairs:
        valid = gt < 255
        for k in range(c):
            t[k] += np.sum((gt == k) & valid)
            p[k] += np.sum((pred == k) & valid)
            tp[k] += np.sum((gt == k) & (pred == k) & valid)
    return float(np.mean(tp / (t + p - tp)))


def test_three_formulations_agree() -> None:
    c = 5
    pairs = _random_pairs(0, c)
    cm = ConfusionMatrix(c)
    for pred, gt in pairs:
        cm.update(pred, gt)
    r = cm.compute()
    assert all(r["present"])
    for ref in (_miou_confusion_add_at, _miou_chainercv_like, _miou_seam_like):
        assert r["miou"] == pytest.approx(ref(pairs, c), abs=1e-12)
    assert cm.compute("mean_all")["miou"] == pytest.approx(r["miou"])


def test_ignore_255_and_out_of_range_gt_not_counted() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1, 7, 1]), np.array([0, 255, 255, 9]))  # preds at ignored gt are never checked
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [0, 0]])


def test_reductions_with_absent_class() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]))  # class 2 absent from gt but predicted once
    r = cm.compute("nanmean_present")
    assert r["present"] == [True, True, False]
    np.testing.assert_allclose(r["iou"], [1.0, 0.5, 0.0])
    assert r["miou"] == pytest.approx(0.75)
    assert cm.compute("nanmean")["miou"] == pytest.approx(0.5)
    assert cm.compute("mean_all")["miou"] == pytest.approx(0.5)

    cm2 = ConfusionMatrix(3)
    cm2.update(np.array([0, 1]), np.array([0, 1]))  # class 2 absent everywhere: IoU NaN
    assert math.isnan(cm2.compute()["iou"][2])
    assert cm2.compute("nanmean")["miou"] == pytest.approx(1.0)
    assert cm2.compute("mean_all")["miou"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="reduction"):
        cm2.compute("median")


def test_pred_ignore_modes() -> None:
    gt = np.array([0, 1, 1, 2])
    pred = np.array([0, 1, 255, 2])
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        ConfusionMatrix(3).update(pred, gt)
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(3, pred_ignore="background").update(np.array([0, 1, 3, 2]), gt)
    bg = ConfusionMatrix(3, pred_ignore="background")
    bg.update(pred, gt)
    np.testing.assert_array_equal(bg.matrix, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    ex = ConfusionMatrix(3, pred_ignore="exclude")
    ex.update(pred, gt)
    np.testing.assert_array_equal(ex.matrix, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="pred_ignore"):
        ConfusionMatrix(3, pred_ignore="drop")


def test_torch_matches_numpy_and_defers_errors() -> None:
    c = 4
    pairs = _random_pairs(1, c)
    cm_np, cm_t = ConfusionMatrix(c), ConfusionMatrix(c)
    for pred, gt in pairs:
        cm_np.update(pred, gt)
        cm_t.update(torch.from_numpy(pred), torch.from_numpy(gt).long())
    assert cm_t.device == torch.device("cpu")
    np.testing.assert_array_equal(cm_np.matrix, cm_t.matrix)
    assert cm_np.compute()["miou"] == cm_t.compute()["miou"]

    bad = ConfusionMatrix(c)
    bad.update(torch.tensor([[0, 9]]), torch.tensor([[0, 1]]))  # no host sync: reported at compute
    with pytest.raises(ValueError, match="1 counted pixels"):
        bad.compute()
    with pytest.raises(ValueError, match="shape mismatch"):
        ConfusionMatrix(c).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ConfusionMatrix(c).update(np.zeros(3), np.zeros(3, dtype=np.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_update_has_no_host_sync() -> None:
    pairs = _random_pairs(3, 4)
    cm, ref, ctx = ConfusionMatrix(4), ConfusionMatrix(4), ContextFalseActivation()
    dev = [(torch.from_numpy(p).cuda(), torch.from_numpy(g).cuda()) for p, g in pairs]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p, g in dev:
            cm.update(p, g)
            ctx.update(p, g % 255)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p, g in pairs:
        ref.update(p, g)
    assert cm.device.type == "cuda"
    np.testing.assert_array_equal(cm.matrix, ref.matrix)
    assert ctx.compute()["pixels"] > 0


def test_merge_and_add() -> None:
    c = 4
    pairs = _random_pairs(2, c)
    full, a, b = ConfusionMatrix(c), ConfusionMatrix(c), ConfusionMatrix(c)
    for i, (pred, gt) in enumerate(pairs):
        full.update(pred, gt)
        (a if i % 2 else b).update(torch.from_numpy(pred) if i % 2 else pred, gt)
    np.testing.assert_array_equal((a + b).matrix, full.matrix)
    np.testing.assert_array_equal(b.merge(a).matrix, full.matrix)
    with pytest.raises(ValueError, match="merge"):
        full.merge(ConfusionMatrix(c + 1))


def test_table_lists_classes() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    text = cm.table(["background", "boat", "train"])
    lines = text.splitlines()
    assert lines[2].startswith("background") and "40.00" in lines[2]
    assert "boat" in text and "train" in text
    assert "mIoU" in text and "37.78" in text and "pixel acc" in text and "55.56" in text
    with pytest.raises(ValueError, match="class names"):
        cm.table(["a", "b"])


def test_context_false_activation_hand_example() -> None:
    # context: class 4 ("boat") owns 4 water pixels, class 2 owns 2 context pixels, the rest is no context.
    context = np.array([[4, 4, 4, 4], [2, 2, 0, 0]], dtype=np.uint8)
    pred = np.array([[4, 0, 4, 2], [2, 0, 4, 4]], dtype=np.uint8)
    acc = ContextFalseActivation()
    acc.update(pred, context)
    r = acc.compute()
    assert r["pixels"] == 6
    assert r["overall"] == pytest.approx(3 / 6)  # (4,4) twice + (2,2) once
    assert r["per_class"] == {2: pytest.approx(0.5), 4: pytest.approx(0.5)}
    t = ContextFalseActivation()
    t.update(torch.from_numpy(pred), torch.from_numpy(context))
    assert t.compute() == r
    assert context_false_activation(pred, context) == pytest.approx(0.5)
    assert context_false_activation(pred, context, context_class=4) == pytest.approx(2 / 6)
    assert math.isnan(context_false_activation(pred, np.zeros_like(context)))


def _write_fixture(root, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple:
    pred_dir, gt_dir = root / "pred", root / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    for image_id, (pred, gt) in pairs.items():
        save_label_png(gt_dir / f"{image_id}.png", gt)
        if pred is not None:
            save_label_png(pred_dir / f"{image_id}.png", pred)
    return pred_dir, gt_dir


def test_evaluate_folders(tmp_path) -> None:
    names = ["background", "boat", "train"]
    gt_a, pred_a = GT[:9].reshape(3, 3), PRED[:9].reshape(3, 3)
    gt_b = np.array([[0, 255], [1, 2]], dtype=np.uint8)
    pred_dir, gt_dir = _write_fixture(tmp_path, {"a": (pred_a, gt_a), "b": (gt_b % 255, gt_b), "c": (None, gt_b)})
    ctx_dir = tmp_path / "ctx"
    ctx_dir.mkdir()
    save_label_png(ctx_dir / "a.png", np.where(gt_a == 0, 1, 0).astype(np.uint8))
    save_label_png(ctx_dir / "b.png", np.zeros_like(gt_b))

    with pytest.raises(FileNotFoundError, match="1 of 3 predictions missing.*c"):
        evaluate_folders(pred_dir, gt_dir, names)
    r = evaluate_folders(pred_dir, gt_dir, names, context_dir=ctx_dir, allow_missing=True)
    assert r["missing"] == ["c"] and r["num_images"] == 2 and r["class_names"] == names
    cm = ConfusionMatrix(3)
    cm.update(pred_a, gt_a)
    cm.update(gt_b % 255, gt_b)
    assert r["miou"] == pytest.approx(cm.compute()["miou"])
    # gt 0 pixels of image a are context of class 1; of the 4, one is predicted 1.
    assert r["context_false_activation"]["overall"] == pytest.approx(1 / 4)

    out = tmp_path / "out" / "metrics.json"
    write_json(out, r)
    assert json.loads(out.read_text())["miou"] == pytest.approx(r["miou"])


def test_evaluate_folders_errors(tmp_path) -> None:
    names = ["background", "boat", "train"]
    gt = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    pred_dir, gt_dir = _write_fixture(tmp_path, {"img7": (np.zeros((2, 3), np.uint8), gt)})
    with pytest.raises(ValueError, match=r"img7: prediction shape \(2, 3\)"):
        evaluate_folders(pred_dir, gt_dir, names)
    save_label_png(pred_dir / "img7.png", np.array([[0, 1], [255, 0]], dtype=np.uint8))
    with pytest.raises(ValueError, match="img7: 1 counted pixels"):
        evaluate_folders(pred_dir, gt_dir, names)
    assert evaluate_folders(pred_dir, gt_dir, names, pred_ignore="background")["pixels"] == 3
    save_label_png(gt_dir / "img7.png", np.array([[0, 1], [5, 255]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"img7: ground truth has ids \[5\]"):
        evaluate_folders(pred_dir, gt_dir, names, pred_ignore="background")
