"""A SeCo training step end to end on the tiny synthetic set: every term finite, state updated, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsss.data.datasets import VOCDataset
from wsss.models import SeCoNet, load_checkpoint, load_model, spec_from_meta
from wsss.train.configs import get_config, model_spec
from wsss.train.loop import RESUME_STATE, train

MICRO = [
    'model.backbone.overrides={"patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2}',
    "model.backbone.img_size=48",
    "pretrained=null",
    "data.crop=48",
    "data.cache_images=false",
    "train.batch_size=4",
    "train.log_every=1",
    "train.ckpt_every=100",
    "cam.input_size=48",
    "cam.scales=[1.0,0.5]",
    'seco.schedule={"cls": [0, 1.0], "cls_aux": [0, 1.0], "ptc": [0, 0.3], "lig": [1, 0.5], "lil": [1, 0.5], '
    '"seg": [1, 0.12], "reg": [1, 0.05]}',
    "seco.n_crops=2",
    "seco.local_crop=16",
    "seco.queue=32",
    "seco.proj_hidden=32",
    "seco.proto_start=1",
    "seco.cam2mask=2",
]


@pytest.fixture(scope="module")
def seco_run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("seco")
    cfg = get_config("seco-tiny-synth", [*MICRO, "train.iters=3"])
    train(cfg, VOCDataset(synth, "train"), out, progress=False)
    return out, cfg


def test_every_term_is_finite_and_switches_on(seco_run):
    out, _ = seco_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for term in ("cls", "cls_aux", "ptc", "seg", "reg", "lil", "lig", "loss"):
            assert np.isfinite(r[term]), (term, r)
    # step 0 (logged as 1) weighs only cls, cls_aux and ptc; from step 1 on all seven terms count
    first = records[0]
    assert first["loss"] == pytest.approx(first["cls"] + first["cls_aux"] + 0.3 * first["ptc"], rel=1e-4)
    assert first["seg"] == first["reg"] == 0.0  # PAR labels and the energy are skipped while they weigh 0
    assert records[1]["seg"] > 0 and records[1]["reg"] != 0


def test_training_state_is_saved_and_the_student_loads_as_seconet(seco_run):
    out, _ = seco_run
    state = torch.load(out / RESUME_STATE, weights_only=True)["objective"]
    assert int(state["queue.ptr"]) == (3 * 4 * 4) % 32  # 3 steps x 4 images x (2 global + 2 local) keys
    torch.testing.assert_close(state["bank.prototypes"].norm(dim=1), torch.ones(8))
    assert "key_encoder.pos_embed" in state and "head_teacher.mlp.0.weight" in state
    loaded = load_model(out / "last.safetensors")
    model, spec = loaded.model, loaded.spec
    assert isinstance(model, SeCoNet) and spec.family == "seco" and spec_from_meta(loaded.meta) == spec
    assert spec.arch["aux_layer"] == -3 and spec.num_fg == 8 and loaded.meta["step"] == 3
    assert spec.cam.input_size == 48 and spec.cam.scales == (1.0, 0.5) and spec.cam.flip_merge == "max"
    logits, cams = model(torch.randn(1, 3, 48, 64))
    assert logits.shape == (1, 8) and cams.shape == (1, 8, 6, 8)
    assert model.segment(torch.randn(1, 3, 48, 64)).shape == (1, 9, 6, 8)


def test_seco_resume_reproduces_the_uninterrupted_run(synth, tmp_path):
    data = VOCDataset(synth, "train")
    cfg = get_config("seco-tiny-synth", [*MICRO, "train.iters=3"])
    straight = train(cfg, data, tmp_path / "a", progress=False)
    train(cfg, data, tmp_path / "b", progress=False, max_steps=2)
    resumed = train(cfg, data, tmp_path / "b", resume=True, progress=False)
    a, meta_a = load_checkpoint(straight)
    b, meta_b = load_checkpoint(resumed)
    assert meta_a["step"] == meta_b["step"] == 3 and meta_a["spec"] == meta_b["spec"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_validation_reports_cam_aux_cam_and_segmentation(seco_run, synth):
    from wsss.train.loop import validate

    out, _ = seco_run
    loaded = load_model(out / "last.safetensors")
    result = validate(loaded.model, VOCDataset(synth, "val"), loaded.spec, "cpu", 6)
    assert set(result) == {"val_seed_miou", "val_aux_seed_miou", "val_seg_miou"}
    assert all(0 <= v <= 1 for v in result.values())


def test_coco_seg_labels_come_from_the_aux_cam_until_the_switch(synth):
    """§3.2 step 3: on COCO the segmentation pseudo-label uses the auxiliary CAM while n < 12 000."""
    from wsss.data.synth import DEMO_CLASSES
    from wsss.models import build_model
    from wsss.train.seco import SeCoObjective

    assert get_config("seco-vitb16-coco")["seco"]["seg_from_aux_until"] == 12000
    assert get_config("seco-vitb16-voc")["seco"]["seg_from_aux_until"] == 0
    cfg = get_config("seco-tiny-synth", [*MICRO, "seco.seg_from_aux_until=5"])
    torch.manual_seed(0)
    model = build_model(model_spec(cfg, ("background", *(c.name for c in DEMO_CLASSES)))).eval()
    assert model.classifier.out_channels == 8
    objective = SeCoObjective(model, cfg)
    x, y = torch.randn(2, 3, 48, 48), torch.tensor([[1.0] + [0.0] * 7, [0.0, 1.0] + [0.0] * 6])
    box = torch.tensor([[0, 48, 0, 48]] * 2)
    before, after = (objective.pseudo_labels(model, x, y, box, step)["seg_label"] for step in (4, 5))
    with torch.no_grad():  # the heads differ, so the two sources give different labels on random weights
        model.aux_classifier.weight.mul_(-1)
    flipped = objective.pseudo_labels(model, x, y, box, 4)["seg_label"]
    assert not torch.equal(before, flipped), "before the switch the label follows the aux CAM"
    assert torch.equal(after, objective.pseudo_labels(model, x, y, box, 5)["seg_label"])


def test_pseudo_labels_under_bf16_autocast_equal_float32():
    """The thresholded pseudo-labels (seg_label, roi, crop positions and flags) come out of a float32 forward
    whatever the autocast: bf16 CAMs would flip pixels near 0.25 / 0.5 / 0.7."""
    import inspect

    from wsss.models import build_model
    from wsss.train.seco import SeCoObjective

    cfg = get_config("seco-tiny-synth", [*MICRO, "seco.local_crop=8", "seco.n_crops=4"])
    torch.manual_seed(0)
    model = build_model(model_spec(cfg, ("background", *(f"c{i}" for i in range(8))))).eval()
    objective = SeCoObjective(model, cfg)
    x, y = torch.randn(2, 3, 48, 48), torch.tensor([[1.0] + [0.0] * 7, [1.0, 1.0] + [0.0] * 6])
    box = torch.tensor([[0, 48, 0, 40]] * 2)
    want = objective.pseudo_labels(model, x, y, box, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = objective.pseudo_labels(model, x, y, box, 3)
        naive = torch.no_grad()(inspect.unwrap(SeCoObjective.pseudo_labels))(objective, model, x, y, box, 3)
    for key in ("aux_cam", "seg_label", "roi", "positions", "flags"):
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(naive["aux_cam"].float(), want["aux_cam"])  # autocast does reach this forward on CPU
