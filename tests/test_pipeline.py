"""End to end on a tiny synthetic set: synth -> train -> cam (+CRF) -> eval, resume, and the CLI's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY

from wsss.cli import cli
from wsss.data.datasets import VOCDataset
from wsss.data.palette import read_label_png
from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsss.models import load_checkpoint, load_model, spec_from_meta
from wsss.train.configs import get_config
from wsss.train.loop import train


@pytest.fixture(scope="module")
def cli_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    result = CliRunner().invoke(cli, ["data", "synth", str(root), "--train", "16", "--val", "6",
                                      "--min-size", "48", "--max-size", "64"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "P(water|boat)" in result.output
    return root


def _invoke(args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_cam_eval(cli_synth, tmp_path):
    synth = cli_synth
    run = tmp_path / "run"
    sets = [x for item in [*TINY, "train.iters=4"] for x in ("--set", item)]
    _invoke(["train", "--config", "cam-tiny-synth", "--data", f"voc:{synth}:train", "--out", run, *sets])
    state, meta = load_checkpoint(run / "last.safetensors")
    spec = spec_from_meta(meta)
    assert spec.family == "cam" and meta["step"] == 4 and spec.class_names[1] == "boat"
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD and "package_version" in meta
    assert meta["config_name"] == "cam-tiny-synth" and meta["seed"] == 0 and meta["config"]["method"] == "cam"
    assert not {"method", "model", "class_names", "mean", "std"} & set(meta)  # all inside the spec
    assert spec.cam.input_size == 48 and spec.cam.scales == (1.0, 0.5) and spec.cam.background == "threshold"
    assert load_model(run / "last.safetensors").spec == spec
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(np.isfinite(r["loss"]) for r in records)

    out = tmp_path / "cam"
    _invoke(["cam", "--ckpt", run / "last.safetensors", "--data", f"voc:{synth}:val", "--out", out,
             "--refine", "crf", "--workers", "1", "--overlays", "2"])  # fmt: skip
    val = VOCDataset(synth, "val")
    for kind in ("seeds", "masks"):
        assert sorted(p.stem for p in (out / kind).glob("*.png")) == sorted(val.ids)
    seed = read_label_png(out / "seeds" / f"{val.ids[0]}.png")
    assert seed.shape == val[0].image.shape[:2]
    assert set(np.unique(seed)) <= {0, *(np.flatnonzero(val.labels(0)) + 1)}  # only the image's own classes
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert json.loads((out / "summary.json").read_text())["images"] == len(val)

    report = tmp_path / "eval.json"
    text = _invoke(["eval", "--pred", out / "masks", "--gt", synth / "SegmentationClass", "--allow-missing",
                    "--context", synth / "ContextMask", "--json", report])  # fmt: skip
    assert "boat" in text and "mIoU" in text and "context false activation" in text
    figures = json.loads(report.read_text())
    assert figures["num_images"] == len(val) and 0 <= figures["miou"] <= 1 and len(figures["iou"]) == 9


def test_resume_reproduces_uninterrupted_run(synth, tmp_path):
    data = VOCDataset(synth, "train")
    straight = train(get_config("cam-tiny-synth", [*TINY, "train.iters=6"]), data, tmp_path / "a", progress=False)
    train(get_config("cam-tiny-synth", [*TINY, "train.iters=6", "train.ckpt_every=100"]), data, tmp_path / "b",
          progress=False, max_steps=4)  # fmt: skip
    assert load_checkpoint(tmp_path / "b" / "last.safetensors")[1]["step"] == 4
    resumed = train(get_config("cam-tiny-synth", [*TINY, "train.iters=6"]), data, tmp_path / "b", resume=True,
                    progress=False)  # fmt: skip
    a, meta_a = load_checkpoint(straight)
    b, meta_b = load_checkpoint(resumed)
    assert meta_a["step"] == meta_b["step"] == 6
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_cli_errors_are_clear(synth, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(cli, ["train", "--config", "cam-tiny-synht", "--data", f"voc:{synth}", "--out", tmp_path])
    assert bad.exit_code == 2 and "did you mean 'cam-tiny-synth'" in bad.output
    bad = runner.invoke(cli, ["train", "--config", "cam-tiny-synth", "--data", f"vox:{synth}", "--out", tmp_path])
    assert bad.exit_code == 2 and "voc:ROOT" in bad.output
    bad = runner.invoke(cli, ["train", "--config", "cam-tiny-synth", "--data", f"voc:{synth}", "--out", tmp_path,
                              "--set", "train.itres=3"])  # fmt: skip
    assert bad.exit_code == 2 and "did you mean 'iters'" in bad.output


def test_cli_refuses_a_junk_checkpoint(synth, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    bad = CliRunner().invoke(cli, ["cam", "--ckpt", junk, "--data", f"voc:{synth}:val", "--out", tmp_path / "o"])
    if bad.exception is not None and not isinstance(bad.exception, SystemExit):
        raise bad.exception  # a crash is not a clear error
    assert bad.exit_code == 2 and "junk.safetensors" in bad.output


@pytest.mark.parametrize("command", [[], ["data", "synth"], ["train"], ["cam"], ["eval"], ["demo"]])
def test_help_teaches_with_an_example(command):
    text = CliRunner().invoke(cli, [*command, "--help"]).output
    assert "Usage:" in text
    if command:
        assert "Example" in text


def test_interrupt_saves_last_finished_step(synth, tmp_path, monkeypatch):
    import wsss.train.loop as loop

    calls = {"n": 0}
    real = loop.OBJECTIVES["cam"]

    class Flaky(real):
        def forward(self, net, batch, step):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt  # Ctrl-C during the 4th step
            return super().forward(net, batch, step)

    monkeypatch.setitem(loop.OBJECTIVES, "cam", Flaky)
    cfg = get_config("cam-tiny-synth", [*TINY, "train.iters=6", "train.ckpt_every=100"])
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3"):
        train(cfg, VOCDataset(synth, "train"), tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.safetensors")[1]["step"] == 3
    monkeypatch.setitem(loop.OBJECTIVES, "cam", real)
    train(cfg, VOCDataset(synth, "train"), tmp_path / "run", resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.safetensors")[1]["step"] == 6
