"""`wsss eval --data SPEC` (a split's ids against its own masks) beside `--gt DIR`, and ids that name subfolders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from wsss.cli import cli
from wsss.data.datasets import VOCDataset
from wsss.data.palette import read_label_png, save_label_png
from wsss.eval.evaluate import evaluate_dataset, evaluate_folders


def _eval(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["eval", *map(str, args)])
    return result.exit_code, result.output


def _predictions(synth: Path, out: Path) -> Path:
    """Every ground-truth mask as a prediction, the first val one wiped to background (so a score can move)."""
    shutil.copytree(synth / "SegmentationClass", out)
    first = VOCDataset(synth, "val").ids[0]
    save_label_png(out / f"{first}.png", np.zeros_like(read_label_png(out / f"{first}.png")))
    return out


def test_eval_data_scores_exactly_the_split_against_its_masks(synth, tmp_path):
    pred = _predictions(synth, tmp_path / "pred")
    val = VOCDataset(synth, "val")
    code, output = _eval("--pred", pred, "--data", f"voc:{synth}:val", "--json", tmp_path / "d.json")
    assert code == 0, output
    by_data = json.loads((tmp_path / "d.json").read_text())
    names = (synth / "classes.txt").read_text().split()
    by_gt = evaluate_folders(pred, synth / "SegmentationClass", names, context_dir=synth / "ContextMask", ids=val.ids)
    assert by_data["num_images"] == len(val) == 6 and by_data["miou"] == by_gt["miou"] < 1.0
    assert by_data["context_false_activation"] == json.loads(json.dumps(by_gt["context_false_activation"]))
    assert f"(context masks: {synth / 'ContextMask'})" in output
    train = evaluate_dataset(pred, VOCDataset(synth, "train"))
    assert train["num_images"] == 16 and train["miou"] == 1.0  # the wiped image is not in this split
    code, output = _eval("--pred", pred, "--gt", synth / "SegmentationClass", "--context", f"voc:{synth}:val")
    assert code == 0 and "context false activation" in output  # --context SPEC: that dataset's ContextMask


def test_eval_refuses_both_or_neither_and_datasets_without_masks(synth, tmp_path):
    pred = _predictions(synth, tmp_path / "pred")
    code, output = _eval("--pred", pred, "--gt", synth / "SegmentationClass", "--data", f"voc:{synth}:val")
    assert code == 2 and "give the ground truth as --gt DIR or as --data SPEC (one of them, not both)" in output
    code, output = _eval("--pred", pred)
    assert code == 2 and "--gt DIR or as --data SPEC" in output
    code, output = _eval("--pred", pred, "--data", f"folder:{synth / 'JPEGImages'}")
    assert code == 1 and "22 of 22 images of FolderDataset(22 images" in output and "no ground-truth mask" in output
    code, output = _eval("--pred", pred, "--data", f"voc:{synth}:val", "--context", tmp_path / "nope")
    assert code == 2 and "nope: not a folder (nor a dataset SPEC)" in output
    one = tmp_path / "one"
    one.mkdir()
    first = VOCDataset(synth, "val").ids[1]
    shutil.copy(pred / f"{first}.png", one / f"{first}.png")
    code, output = _eval("--pred", one, "--data", f"voc:{synth}:val")
    assert code == 1 and "5 of 6 predictions missing" in output
    code, output = _eval("--pred", one, "--data", f"voc:{synth}:val", "--allow-missing", "--json", tmp_path / "m.json")
    assert code == 0 and json.loads((tmp_path / "m.json").read_text())["num_images"] == 1


def test_ids_with_subfolders_are_scored(tmp_path):
    for root in ("gt", "pred"):
        save_label_png(tmp_path / root / "sub" / "a.png", np.ones((4, 5), np.uint8))
        save_label_png(tmp_path / root / "b.jpg.png", np.zeros((4, 5), np.uint8))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ("background", "thing"))
    assert result["num_images"] == 2 and result["miou"] == 1.0 and result["missing"] == []
    code, output = _eval("--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--allow-missing",
                         "--json", tmp_path / "r.json")  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["num_images"] == 2
