"""Shared fixtures: a tiny synthetic dataset and a tiny trained CAM checkpoint (seconds on 2 cores)."""

from __future__ import annotations

import pytest

from wsss.data.datasets import VOCDataset
from wsss.data.synth import SynthConfig, generate_synth
from wsss.train.configs import get_config
from wsss.train.loop import train

# A short run at 48 px, shared by the tiny test networks below.
_SMALL_RUN = [
    "model.backbone.img_size=48",
    "pretrained=null",
    "data.crop=48",
    "train.batch_size=4",
    "train.log_every=2",
    "train.ckpt_every=2",
    "cam.input_size=48",
    "cam.scales=[1.0,0.5]",
]

TINY = ['model.backbone.overrides={"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}', *_SMALL_RUN]

# A CoBra network small enough for CPU tests (three fixture classes, 48 px, two-block ViT, tiny ResNet).
TINY_COBRA = [
    'model.backbone.overrides={"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}',
    *_SMALL_RUN,
    "model.cnn.channels=[8,16,16,32]",
    "model.proj_dim=16",
    "pretrained_cnn=null",
    "cobra.k_sap=[4,2]",
    "cobra.k_cap=[2,4]",
    "cobra.aux_start_epoch=0",
]


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, SynthConfig(n_train=16, n_val=6, min_size=48, max_size=64), progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(synth, tmp_path_factory):
    cfg = get_config("cam-tiny-synth", [*TINY, "train.iters=4"])
    return train(cfg, VOCDataset(synth, "train"), tmp_path_factory.mktemp("run"), progress=False)
