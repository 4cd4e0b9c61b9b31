"""benchmarks/transfer.py: the threshold and CRF sweeps and the CAM strip on a tiny trained network."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import transfer  # noqa: E402
from common import val_seed_scores  # noqa: E402
from wsss.cam.crf import CRF_PRESETS  # noqa: E402
from wsss.data.datasets import VOCDataset  # noqa: E402
from wsss.data.palette import save_label_png  # noqa: E402
from wsss.eval.evaluate import evaluate_folders  # noqa: E402
from wsss.runtime.backends import open_backend  # noqa: E402
from wsss.runtime.labeler import LabelConfig, label_dataset  # noqa: E402


def test_threshold_sweep_picks_on_train_and_matches_the_labeler(tiny_ckpt, synth, tmp_path: Path) -> None:
    sweep = transfer.threshold_sweep(tiny_ckpt, synth, train_images=8)
    n = len(sweep["thresholds"])
    assert len(sweep["train"]) == len(sweep["val"]) == n
    best = int(np.argmax(sweep["train"]))
    assert sweep["picked"] == sweep["thresholds"][best] and sweep["val_at_picked"] == sweep["val"][best]
    # one point of the val curve is what the batch labeler's seeds score at that threshold
    t = sweep["thresholds"][n // 2]
    labeled = val_seed_scores(tiny_ckpt, synth, tmp_path / "val", background=t)
    assert sweep["val"][n // 2] == pytest.approx(labeled["miou"], abs=1e-6)


def test_crf_sweep_picks_on_train_and_its_row_c_is_the_labeler_s_crf(tiny_ckpt, synth, tmp_path: Path) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    row_c = CRF_PRESETS["seed"]
    grid = [dataclasses.replace(row_c, bi_srgb=30, bi_compat=4), row_c]
    sweep = transfer.crf_sweep(tiny_ckpt, synth, train_images=8, grid=grid)
    assert len(sweep["train"]) == len(sweep["val"]) == 2 and sweep["val_row_c"] == sweep["val"][1]
    best = int(np.argmax(sweep["train"]))
    assert sweep["picked"] == dataclasses.asdict(grid[best]) and sweep["val_at_picked"] == sweep["val"][best]
    assert sweep["val"][0] != sweep["val"][1]  # the kernels reach the CRF
    # unrefined: the labeler's seeds; row C: the labeler's --refine crf labels (pydensecrf)
    assert sweep["val_unrefined"] == pytest.approx(val_seed_scores(tiny_ckpt, synth, tmp_path / "s")["miou"], abs=1e-6)
    backend, spec, meta = open_backend(tiny_ckpt)
    val = VOCDataset(synth, "val")
    config = LabelConfig(spec.cam, refine="crf", crf_impl="pydensecrf", quiet=True)
    label_dataset(backend, spec, meta, val, tmp_path / "crf", config)
    names = list(spec.class_names)
    scores = evaluate_folders(tmp_path / "crf" / "labels", synth / "SegmentationClass", names, ids=val.ids)
    assert sweep["val_row_c"] == pytest.approx(scores["miou"], abs=1e-6)


def test_cam_strip_draws_a_band_per_class(tiny_ckpt, synth, tmp_path: Path) -> None:
    val = transfer.VOCDataset(synth, "val")
    held = [name for k, name in enumerate(val.classes[1:]) if any(val.labels(i)[k] for i in range(len(val)))]
    path = transfer.cam_strip(tiny_ckpt, synth, tmp_path / "cams.png", held[:2], n=2)
    assert cv2.imread(str(path)).shape == (2 * 3 * 112, 2 * 112, 3)
    absent = [name for name in val.classes[1:] if name not in held]
    assert absent, "the fixture's val split should miss a class"
    with pytest.raises(SystemExit, match="no val image holds"):
        transfer.cam_strip(tiny_ckpt, synth, tmp_path / "none.png", absent)
    with pytest.raises(SystemExit, match="no class 'unicorn'"):
        transfer.cam_strip(tiny_ckpt, synth, tmp_path / "none.png", ["unicorn"])


def test_generator_settings_reach_the_set_and_its_folder(tmp_path: Path) -> None:
    settings = transfer.generator_settings("probe", ["p_pair=0", 'backgrounds=["flat"]', "max_objects=1"])
    assert settings == {"p_pair": 0, "backgrounds": ["flat"], "max_objects": 1}
    root = transfer.dataset("probe", 4, 2, 0, tmp_path, settings)
    assert root.name == "probe-4-2-d0-backgrounds=flat-max_objects=1-p_pair=0"
    stats = json.loads((root / "probe_stats.json").read_text())
    assert stats["config"]["backgrounds"] == ["flat"] and stats["config"]["max_objects"] == 1
    assert transfer.dataset("probe", 4, 2, 0, tmp_path).name == "probe-4-2-d0"
    with pytest.raises(ValueError, match="KEY one of"):
        transfer.generator_settings("probe", ["p_unicorn=1"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        transfer.generator_settings("synth", ["p_context"])


def test_false_positive_places_split_a_class_s_errors_by_where_they_lie(tmp_path: Path) -> None:
    root = transfer.dataset("probe", 2, 1, 0, tmp_path)  # a VOC layout whose val mask is replaced by a known one
    truth = np.zeros((40, 40), np.uint8)
    truth[10:30, 10:30] = 4  # a nut: a square ring around a 10 x 10 hole
    truth[15:25, 15:25] = 0
    truth[0, :] = 255
    pred = np.zeros_like(truth)
    pred[12:28, 12:28] = 4  # 240 px of the ring, the 100 px hole
    pred[5:8, 15:18] = 4  # 9 px 3-5 px above the hull
    pred[36:40, 36:40] = 4  # 16 px more than 8 px from it
    pred[0, 30:35] = 4  # on the ignore row: not counted
    (image_id,) = transfer.VOCDataset(root, "val").ids
    save_label_png(root / "SegmentationClass" / f"{image_id}.png", truth)
    save_label_png(tmp_path / "seeds" / f"{image_id}.png", pred)
    places = transfer.false_positive_places(tmp_path / "seeds", root)["nut"]
    assert places["recall"] == pytest.approx(156 / 300)
    assert places["fp_per_tp"] == pytest.approx(125 / 156)
    assert (places["hull"], places["near"], places["far"]) == pytest.approx((100 / 125, 9 / 125, 16 / 125))


def test_threshold_sweep_tries_one_scale_and_layer_cam_on_a_vgg_trunk(synth, tmp_path: Path) -> None:
    from wsss.train.configs import get_config
    from wsss.train.loop import train

    overrides = ["pretrained=null", "model.img_size=48", "data.crop=48", "train.batch_size=4", "train.iters=2",
                 "train.ckpt_every=2", "cam.input_size=48", "cam.scales=[1.0,0.5]"]  # fmt: skip
    ckpt = train(get_config("cam-vgg-synth", overrides), VOCDataset(synth, "train"), tmp_path, progress=False)
    sweep = transfer.threshold_sweep(ckpt, synth, train_images=8)
    rows = sweep["variants"]
    assert list(rows) == list(transfer.CAM_VARIANTS) and rows["LayerCAM 1,2, scale 1.0"]["layers"] == [1, 2]
    assert sweep["val"] == rows["config"]["val"] == rows["LayerCAM 1,2"]["val"]  # the config's own settings
    assert rows["CAM"]["layers"] == [] and rows["CAM"]["val"] != rows["LayerCAM 1,2"]["val"]
    best = max(rows, key=lambda name: max(rows[name]["train"]))
    assert sweep["best"] == {"variant": best, "threshold": rows[best]["picked"], "val": rows[best]["val_at_picked"]}


def test_score_gives_the_labeler_s_seeds_and_crf_labels_from_one_pass(tiny_ckpt, synth, tmp_path: Path) -> None:
    result = transfer.score(tiny_ckpt, synth, tmp_path / "one")
    seeds = val_seed_scores(tiny_ckpt, synth, tmp_path / "seeds")
    assert result["miou"] == pytest.approx(seeds["miou"], abs=1e-6)
    assert list(result["iou"]) == seeds["class_names"] and list(result["labels"]["iou"]) == seeds["class_names"]
    backend, spec, meta = open_backend(tiny_ckpt)
    val = VOCDataset(synth, "val")
    label_dataset(backend, spec, meta, val, tmp_path / "crf", LabelConfig(spec.cam, refine="crf", quiet=True))
    names = list(spec.class_names)
    crf = evaluate_folders(tmp_path / "crf" / "labels", synth / "SegmentationClass", names, ids=val.ids)
    assert result["labels"]["miou"] == pytest.approx(crf["miou"], abs=1e-6)
    assert result["labels"]["miou"] != result["miou"]  # the labels are refined, not a copy of the seeds
    assert set(result["false_positives"]) == set(seeds["class_names"][1:])


def test_rescore_uses_the_config_s_cam_settings_as_they_are_now(tiny_ckpt, synth, tmp_path: Path) -> None:
    from conftest import TINY

    runs = transfer.rescore([tiny_ckpt], synth, tmp_path, [*TINY, "cam.bkg_thresh=0.3"])
    (row,) = runs["cam-tiny-synth"].values()
    assert list(runs["cam-tiny-synth"]) == ["0"] and row["checkpoint"] == str(tiny_ckpt)
    at_03 = val_seed_scores(tiny_ckpt, synth, tmp_path / "t03", background=0.3)
    assert row["miou"] == pytest.approx(at_03["miou"], abs=1e-6)
    assert transfer.summarize(runs)["cam-tiny-synth"]["labels_miou_mean"] == row["labels"]["miou"]


def test_rescore_refuses_a_checkpoint_without_its_training_record(tiny_ckpt, synth, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    meta = json.loads(safe_open(str(tiny_ckpt), "pt").metadata()["wsss"])
    meta.pop("config_name")
    save_file(load_file(str(tiny_ckpt)), str(bare), {"wsss": json.dumps(meta)})
    with pytest.raises(SystemExit, match="bare.safetensors: no config name or training seed"):
        transfer.rescore([bare], synth, tmp_path, [])
