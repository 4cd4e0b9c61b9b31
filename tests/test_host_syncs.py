"""No host syncs in a SeCo or a CoBra training step.

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` raises at any synchronising call of a whole step. On the CPU a
dispatch mode flags the operations that synchronise on a GPU (``.item()``, ``nonzero``, boolean-mask indexing,
``masked_select``, tensors made from host data, ...) in the objective's forward and backward.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from conftest import TINY_COBRA
from torch.utils._python_dispatch import TorchDispatchMode

import wsss
from wsss.data.datasets import VOCDataset
from wsss.train.configs import get_config
from wsss.train.loop import _batches, build_training, train_step, training_set

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.lift_fresh, aten.is_nonzero, aten.equal,
           aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.repeat_interleave}  # fmt: skip
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
MICRO_SECO = [
    'model.backbone.overrides={"patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2}',
    "model.backbone.img_size=48",
    "seco.n_crops=2",
    "seco.local_crop=16",
    "seco.queue=32",
    "seco.proj_hidden=32",
]
RUNS = {"seco": MICRO_SECO, "cobra": TINY_COBRA}
SHARED = ["pretrained=null", "data.crop=48", "train.batch_size=2", "train.workers=0", "cam.input_size=48",
          "cam.scales=[1.0,0.5]"]  # fmt: skip
# functions whose host round trip is on the CPU only: range checks (torch._assert_async on CUDA) and the kernels'
# PyTorch references (Triton runs on CUDA)
CPU_ONLY = {"check_range", "_reference"}
PACKAGE = os.path.dirname(wsss.__file__) + os.sep  # the package's own frames (a checkout may itself be named wsss)


# syncs found outside wsss/train, reported to their owners; each entry must still occur (remove it once fixed)
class HostSyncs(TorchDispatchMode):
    """Records every operation that would wait for the GPU, with the innermost ``wsss`` frame that called it."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _syncs(func, args):
            where = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
            if not (where and where[-1].name in CPU_ONLY):
                frame = where[-1] if where else None
                self.found.append(f"{frame.filename[len(PACKAGE) :]}:{frame.name}" if frame else str(func))
        return func(*args, **(kwargs or {}))


def _syncs(func, args) -> bool:
    """Would ``func`` wait for the GPU? ``x[mask] = scalar`` would not: PyTorch makes the scalar a CPU tensor and
    dispatches to ``masked_fill_``, so a Python scalar lifted to a tensor is not flagged either."""
    op = func.overloadpacket
    if op is aten.lift_fresh:
        return args[0].numel() > 1  # host data (a list, an array) that a GPU step would copy over
    if op in INDEXING:
        masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        fill = (
            op is not aten.index
            and len(masks) == len([i for i in args[1] if i is not None]) == 1
            and args[2].numel() == 1
        )
        return bool(masks) and not fill
    return op in SYNCING


def _step_setup(method: str, synth, device: str = "cpu"):
    cfg = get_config(f"{method}-tiny-synth", [*RUNS[method], *SHARED])
    s = cfg.get("seco")
    if s:  # every term on from step 1, the ROI from the main CAM
        s.update(schedule={name: [1, w] for name, (_, w) in s["schedule"].items()}, proto_start=1, cam2mask=1)
    torch.manual_seed(0)
    _, model, objective, optim = build_training(cfg, VOCDataset(synth, "train").classes, torch.device(device))
    batches = _batches(training_set(cfg, VOCDataset(synth, "train"), 0), cfg["train"], 0, 0, 1, 0, verbose=False)
    return model, objective, optim, lambda: {k: v.to(device) for k, v in next(batches).items()}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_a_training_step_asks_nothing_of_the_host(method, synth):
    model, objective, optim, batch = _step_setup(method, synth)
    train_step(model, objective, optim, batch(), 1, amp=False)  # warm-up: caches filled once
    step_batch = batch()
    with HostSyncs() as mode:
        losses = objective(model, step_batch, 2)
        losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert not mode.found, "host syncs in the step:\n" + "\n".join(sorted(set(mode.found)))


def test_the_detector_sees_the_patterns():
    x = torch.randn(6)
    with HostSyncs() as mode:
        x[x > 0].sum()
        float(x.sum())
        torch.tensor([1.0, 2.0])
        x.nonzero()
        x[x > 0] = torch.zeros(6)[x > 0]
    assert len(mode.found) == 6, mode.found  # the last line: two boolean-mask indexings
    with HostSyncs() as mode:
        x[x > 0] = 0  # masked_fill_: no sync
        x.masked_fill_(x < 0, 1.0)
        torch.where(x > 0, x, 0.0)
    assert not mode.found, mode.found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(RUNS))
def test_a_cuda_training_step_never_synchronises(method, synth):
    """The whole AMP step (objective, backward, optimiser) under ``set_sync_debug_mode("error")``."""
    model, objective, optim, batch = _step_setup(method, synth, "cuda")
    train_step(model, objective, optim, batch(), 1, amp=True)
    step_batch = batch()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = train_step(model, objective, optim, step_batch, 2, amp=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v) for v in losses.values())
