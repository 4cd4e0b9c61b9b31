"""``wsss bench pipeline``: the projection arithmetic, the stage tables, the official-style loss swaps, the outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY

import wsss.runtime.pipeline_bench as pb
import wsss.train.cobra as cobra_objective
import wsss.train.seco as seco_objective
from wsss.cli import cli
from wsss.train.cobra_losses import cap_loss, sap_loss
from wsss.train.configs import CONFIGS, get_config
from wsss.train.irn import IRNConfig
from wsss.train.official_loops import _cap_official, _sap_official, official_losses


def test_projection_arithmetic_against_hand_computed_minutes():
    # SeCo's log: 1.61 s/it x 20,000 iterations = 32,200 s = 536.67 min
    assert pb.project_minutes(1.61, 20000) == pytest.approx(536.6667, abs=1e-3)
    # CoBra measured at batch 2 of the paper's 32: 2.5 s x 16 x 6,600 / 60 = 4,400 min
    assert pb.project_minutes(2.5, 6600, batch_measured=2, batch_paper=32) == pytest.approx(4400.0)
    # per image over VOC train_aug: 0.3 s x 10,582 / 60 = 52.91 min
    assert pb.project_minutes(0.3, pb.VOC_IMAGES["train_aug"]) == pytest.approx(52.91)
    # CoBra's IRN (§4.10): 4 epochs x floor(10,582 / 32) = 4 x 330 steps
    assert pb.irn_steps(IRNConfig()) == 1320
    assert pb.irn_steps(IRNConfig.irn()) == 3 * 330
    row = {"ours": [1.0, 3.0], "official": [4.0, 6.0], "count": 600, "batch_measured": 1, "batch_paper": 4}
    assert pb.stage_minutes(row, "ours") == pytest.approx(2.0 * 4 * 600 / 60)
    assert pb.stage_minutes({**row, "official": None}, "official") == pb.stage_minutes(row, "ours")  # shared


def test_summaries_total_each_column_and_flag_missing_stages():
    rows = [{"column": "CAM", "minutes": {"ours": 10.0, "official": 30.0}},
            {"column": "Refine", "minutes": {"ours": 5.0, "official": 5.0}},
            {"column": "Decoder", "minutes": {"ours": 5.0, "official": 5.0}}]  # fmt: skip
    summary = pb.summarise(rows)
    assert summary["minutes"] == {"ours": 20.0, "official": 40.0} and summary["ratio"] == 2.0
    assert summary["columns"]["official"] == {"CAM": 30.0, "Refine": 5.0, "Decoder": 5.0} and summary["complete"]
    partial = pb.summarise([*rows[:2], {"column": "Decoder", "error": "ValueError: no config"}])
    assert partial["minutes"]["ours"] == 15.0 and not partial["complete"]


def test_every_stage_names_an_existing_config_and_a_timer():
    assert {"seco", "cobra", "cam"} <= set(pb.PIPELINES)
    for method, stages in pb.PIPELINES.items():
        assert stages[0].kind == "train" and get_config(stages[0].config)["method"] == method
        for stage in stages:
            assert stage.config in CONFIGS, f"{method}: {stage.name} names no config {stage.config!r}"
            assert pb.TINY[stage.config] in CONFIGS, f"{stage.config}: its tiny stand-in is not a config"
            assert stage.kind in pb.RUNNERS, f"{method}: {stage.name} has no timer"
            assert stage.column in pb.COLUMNS
            assert stage.images is None or stage.images in pb.VOC_IMAGES


def test_official_style_losses_match_ours_in_the_code_mode_and_are_restored():
    g = torch.Generator().manual_seed(0)
    b, side, d = 2, 4, 16
    n = side * side
    v = torch.nn.functional.normalize(torch.randn(b, n, d, generator=g), dim=-1)
    m_cnn, labels = torch.randn(b, 4, side, side, generator=g), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    affinity = torch.rand(b, n, n, generator=g).softmax(-1)
    ours = sap_loss(v, m_cnn, labels, 5, 3, 0.1, "raw_cam", "zero", "all", "code")
    torch.testing.assert_close(_sap_official(v, m_cnn, labels, 5, 3, 0.1), ours.reshape(()), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_cap_official(v, affinity, 3, 5, 0.1), cap_loss(v, affinity, 3, 5, 0.1).reshape(()),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    before = (seco_objective.lil_loss, cobra_objective.sap_loss)
    with official_losses("seco"), official_losses("cobra"):
        assert seco_objective.lil_loss is not before[0] and cobra_objective.sap_loss is not before[1]
    assert (seco_objective.lil_loss, cobra_objective.sap_loss) == before


def test_cli_writes_json_and_png_and_records_a_stage_that_cannot_run(tmp_path, synth, monkeypatch):
    mini = (pb.Stage("CAM training", "train", "cam-vitb16-voc", "CAM"),
            pb.Stage("seeds + CRF", "seeds", "cam-vitb16-voc", "Refine", "train_aug"),
            pb.Stage("no such stage", "warp-drive", "cam-vitb16-voc", "Decoder"))  # fmt: skip
    monkeypatch.setitem(pb.PIPELINES, "mini", mini)
    monkeypatch.setitem(CONFIGS, "cam-bench-test", get_config("cam-tiny-synth", TINY))  # one block at 48 px
    monkeypatch.setitem(pb.TINY, "cam-vitb16-voc", "cam-bench-test")
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    args = ["bench", "pipeline", "--data", f"voc:{synth}:train", "--val", f"voc:{synth}:val", "--methods",
            "mini", "--tiny", "--warmup", "1", "--steps", "1", "--images", "2", "--warmup-images", "0", "--batch",
            "2", "--workers", "0", "--json", str(out), "--png", str(png)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Table 4" in result.output and "1.61 s/iteration" in result.output
    record = json.loads(out.read_text())
    assert record["mode"] == "reduced steps on CPU" and record["device"]["cpu_count"]
    summary = record["methods"]["mini"]
    train, seeds, missing = summary["stages"]
    assert train["count"] == 20000 and train["batch_measured"] == 2 and train["batch_paper"] == 4
    assert train["shared"] and len(train["ours"]) == 1  # CAM has no loss of its own to transcribe
    assert train["minutes"]["ours"] == pytest.approx(train["ours"][0] * 2 * 20000 / 60)
    assert seeds["count"] == 10582 and not seeds["shared"] and seeds["official"][0] > 0
    assert seeds["minutes"]["official"] == pytest.approx(np.mean(seeds["official"]) * 10582 / 60)
    assert "warp-drive" in missing["error"] and not summary["complete"]
    assert summary["minutes"]["ours"] == pytest.approx(train["minutes"]["ours"] + seeds["minutes"]["ours"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_official_style_segmentation_agrees_with_the_labelers_protocol(synth):
    from wsss.cam.seg import predict_segmentation, refine_segmentation, seg_settings
    from wsss.data.datasets import VOCDataset
    from wsss.models import build_model
    from wsss.runtime.backends import TorchBackend
    from wsss.train.configs import model_spec

    data = VOCDataset(synth, "val")
    spec = model_spec(get_config("deeplab-tiny-synth", ["cam.input_size=48"]), data.classes)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    settings = seg_settings(spec.cam)
    image = data[0].image
    backend = TorchBackend(model, "cpu", spec=spec, what="seg")
    probs = predict_segmentation(backend, [image], [None], settings, "cpu", spec.mean, spec.std)[0].cam
    ours = np.asarray(refine_segmentation([image], [probs.numpy()], "pydensecrf")[0])
    official = pb.official_seg_predict(model.segment, image, spec.mean, spec.std, 48, settings.scales)
    assert official.shape == image.shape[:2]
    assert (official == ours).mean() > 0.999
