"""The demo end to end on a micro SeCo network: every step runs, and ONNX Runtime labels like PyTorch."""

from __future__ import annotations

import json

from test_seco_train import MICRO

from wsss.demo import run_demo
from wsss.eval.evaluate import label_agreement


def test_demo_runs_every_step_and_onnx_labels_agree(tmp_path) -> None:
    res = run_demo(tmp_path, [*MICRO, "seco.n_crops=2", "seco.local_crop=16", "seco.queue=32"], n_train=12,
                   n_val=4, iters=3)  # fmt: skip
    assert list(res["steps_s"]) == ["generate", "train", "label", "export", "label_onnx", "evaluate", "report"]
    assert res["config"]["train"]["iters"] == 3 and "train_seeds" not in res  # the quick run labels val only
    for kind in ("seeds", "masks"):
        assert 0.0 <= res[f"val_{kind}"]["miou"] <= 1.0
    assert res["onnx_agreement"]["images"] == 4
    assert res["onnx_agreement"]["pixel_agreement"] > 0.99  # arg-max ties may flip on float noise
    assert json.loads((tmp_path / "results.json").read_text())["steps_s"].keys() == res["steps_s"].keys()
    assert len(list((tmp_path / "cam_val" / "report").glob("*.png"))) == 4  # the report's titled overlays
    assert (tmp_path / "cam_val" / "report.html").is_file() and res["report"].endswith("report.html")


def test_demo_full_trains_the_final_network_on_the_masks(tmp_path) -> None:
    seg = ["train.iters=2", "train.batch_size=4", "data.crop=48"]
    res = run_demo(tmp_path, [*MICRO, "seco.n_crops=2", "seco.local_crop=16", "seco.queue=32"], n_train=12,
                   n_val=4, iters=2, full=True, seg_overrides=seg)  # fmt: skip
    assert "final_network" in res["steps_s"] and {"train_seeds", "train_masks", "val_final"} <= res.keys()
    assert len(list((tmp_path / "cam_train" / "masks").glob("*.png"))) == 12  # what the final network learns from
    for kind in ("seeds", "masks"):  # its raw §3.15 prediction and the CRF-refined one, scored on val
        assert res["val_final"][kind]["num_images"] == 4 and 0.0 <= res["val_final"][kind]["miou"] <= 1.0


def test_label_agreement_counts_pixels_and_identical_files(tmp_path) -> None:
    import numpy as np

    from wsss.data.palette import save_label_png

    for folder, second in (("a", [[1, 1], [0, 0]]), ("b", [[1, 2], [0, 0]])):
        (tmp_path / folder).mkdir()
        save_label_png(tmp_path / folder / "x.png", np.zeros((2, 2), np.uint8))
        save_label_png(tmp_path / folder / "y.png", np.array(second, np.uint8))
    agree = label_agreement(tmp_path / "a", tmp_path / "b", ["x", "y"])
    assert agree == {"images": 2, "identical_images": 1, "pixel_agreement": 7 / 8}
