"""Two gloo ranks train SeCo and CoBra for a few steps and end with bit-identical model and objective state.

Each rank is a spawned process with torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); it
captures the model and objective that ``train`` builds and saves every parameter and buffer of both.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_COBRA

from wsss.data.datasets import VOCDataset
from wsss.models import load_model
from wsss.train.configs import get_config
from wsss.train.loop import RESUME_STATE, validate

STEPS = 3
SHARED = ["pretrained=null", "data.crop=48", "data.cache_images=false", "train.batch_size=2", f"train.iters={STEPS}",
          "train.log_every=1", f"train.ckpt_every={STEPS}", "cam.input_size=48", "cam.scales=[1.0,0.5]"]  # fmt: skip
RUNS = {
    "seco": [
        *SHARED,
        'model.backbone.overrides={"patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2}',
        "model.backbone.img_size=48",
        f"train.eval_every={STEPS}",
        "train.eval_images=6",
        'seco.schedule={"cls": [0, 1.0], "cls_aux": [0, 1.0], "ptc": [0, 0.3], "lig": [1, 0.5], "lil": [1, 0.5], '
        '"seg": [1, 0.12], "reg": [1, 0.05]}',
        "seco.n_crops=2",
        "seco.local_crop=16",
        "seco.queue=32",  # 2 ranks x 2 images x (2 global + 2 local) keys per step
        "seco.proj_hidden=32",
        "seco.proto_start=1",
    ],
    "cobra": [*TINY_COBRA, *SHARED],  # the tiny CNN's BatchNorm is live: its statistics must stay rank 0's
}


def _rank(rank: int, world: int, port: int, synth: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    import wsss.train.loop as loop

    built = {}

    def capturing(cls):
        def build(model, cfg):
            built.update(model=model, objective=cls(model, cfg))
            return built["objective"]

        return build

    loop.OBJECTIVES = {name: capturing(cls) for name, cls in loop.OBJECTIVES.items()}
    for method, overrides in RUNS.items():
        cfg = get_config(f"{method}-tiny-synth", overrides)
        val = VOCDataset(synth, "val") if method == "seco" else None
        loop.train(cfg, VOCDataset(synth, "train"), Path(out) / method, val=val, progress=False)
        state = {f"{part}.{name}": t.detach().clone() for part in ("model", "objective")
                 for name, t in [*built[part].named_parameters(), *built[part].named_buffers()]}  # fmt: skip
        torch.save(state, Path(out) / f"{method}-rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(synth), str(out)), nprocs=2)
    return out


@pytest.mark.parametrize("method", sorted(RUNS))
def test_two_ranks_hold_identical_state(two_ranks, method):
    """Every parameter and buffer of the model and of the objective (SeCo: phi, phi_t, E_k, bank, queue) is
    bit-identical on both ranks after training with every term on."""
    a, b = (torch.load(two_ranks / f"{method}-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys() and any(k.startswith("objective.") for k in a) == (method == "seco")
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ across ranks, e.g. {different[:5]}"


def test_rank_zero_logs_and_both_ranks_keys_are_queued(two_ranks):
    records = [json.loads(line) for line in (two_ranks / "seco" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # rank 0 logs once per step
    assert all(r["lil"] != 0 and r["seg"] > 0 for r in records[1:] if "loss" in r)
    state = torch.load(two_ranks / "seco" / RESUME_STATE, weights_only=True)["objective"]
    assert int(state["queue.ptr"]) == (STEPS * 16) % 32  # both ranks' keys enqueued at every step


def test_sharded_validation_equals_the_single_process_one(two_ranks, synth):
    """The ranks validate alternate images and sum their confusion matrices: the same mIoUs as one process."""
    records = [json.loads(line) for line in (two_ranks / "seco" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in records if "val_seed_miou" in r)
    loaded = load_model(two_ranks / "seco" / "last.safetensors")
    alone = validate(loaded.model, VOCDataset(synth, "val"), loaded.spec, "cpu", 6)
    assert {k: v for k, v in logged.items() if k != "step"} == alone
