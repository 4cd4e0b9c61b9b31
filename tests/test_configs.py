"""Every named config (``wsss train --list-configs``) builds and takes one optimiser step with every term on.

Random weights, a 64 px crop and batch 2, so SeCo's local windows shrink to 32 px and CoBra ranks at most 8 of its
16 patches; everything else is the config's own: architecture, optimiser (CoBra's PolySGD), losses, schedule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsss.data.datasets import VOCDataset
from wsss.train.configs import CONFIGS, config_summaries, get_config
from wsss.train.loop import _batches, build_training, train_step, training_set


def test_list_configs_prints_every_config():
    output = CliRunner().invoke(__import__("wsss.cli").cli.cli, ["train", "--list-configs"]).output
    assert [line.split()[0] for line in output.splitlines()] == list(config_summaries()) == sorted(CONFIGS)


@pytest.mark.parametrize("name", list(config_summaries()))
def test_every_config_takes_an_optimizer_step(name, synth, tmp_path):
    overrides = ["pretrained=null", "data.crop=64", "data.cache_images=false", "train.batch_size=2",
                 "train.workers=0"]  # fmt: skip
    cfg = get_config(name, overrides)
    if cfg["method"] == "seco":
        cfg["seco"]["local_crop"] = 32  # 64 px windows need a crop above 128
    if cfg["method"] == "cobra":
        cfg["pretrained_cnn"] = None
        cfg["cobra"].update(k_sap=[8, 4], k_cap=[4, 8])
    data = VOCDataset(synth, "train")
    if cfg["method"] == "sccam":  # a joint round (7.10): the sub-category head on random pseudo labels
        cfg = sccam_round(cfg, tmp_path, data)
    torch.manual_seed(0)
    _, model, objective, optim = build_training(cfg, data.classes, torch.device("cpu"), verbose=False)
    batch = next(_batches(training_set(cfg, data, 0), cfg["train"], 0, 0, 1, 0, verbose=False))
    heads = optim.param_groups[1]["params"]
    before = [p.detach().clone() for p in heads]
    losses = train_step(model, objective, optim, batch, cfg["train"]["iters"] - 1, amp=False)  # every term on
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert any(not torch.equal(a, p) for a, p in zip(before, heads, strict=True)), "the step moved no head"


def sccam_round(cfg, folder, data):
    """Round 1 of an SC-CAM config, its sub-category labels random (one per parent class present)."""
    from wsss.train.sccam_rounds import round_config

    k = cfg["model"]["sub_k"]
    labels = torch.stack([torch.from_numpy(data.labels(i)) for i in range(len(data))])
    picks = torch.nn.functional.one_hot(torch.randint(k, labels.shape, generator=torch.Generator().manual_seed(0)), k)
    path = folder / f"sub_labels_k{k}.npz"
    np.savez(path, sub_labels=(picks * labels[..., None]).flatten(1).to(torch.uint8).numpy())
    return round_config(cfg, 1, path)


SHIPPED = [(n, part, key) for n, c in sorted(CONFIGS.items()) for part, key in (("backbone", "pretrained"),
           ("cnn", "pretrained_cnn")) if str(c.get(key)).startswith("builtin:")]  # fmt: skip


@pytest.mark.parametrize(("name", "part", "key"), SHIPPED)
def test_shipped_weights_fit_the_configs_that_name_them(name, part, key):
    """Every ``builtin:`` file a config starts from exists and fills its part of the network, shape for shape."""
    from wsss.models import build_model, load_pretrained
    from wsss.train.configs import model_spec

    cfg = get_config(name)
    model = build_model(model_spec(cfg, ("background", "a", "b")))
    report = load_pretrained(model, cfg[key], part).check(allow_missing=True, allow_unexpected=True)
    target = getattr(model, part)
    assert report.loaded > 0 and not report.mismatched
    assert report.loaded >= 0.9 * len(target.state_dict()), report
