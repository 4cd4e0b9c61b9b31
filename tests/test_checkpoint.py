"""Checkpoints: safetensors round trips with metadata, and every way a weight file can be bad or hostile."""

from __future__ import annotations

import copy
import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wsss
from wsss.models import (
    BackboneConfig,
    CAMNet,
    CheckpointError,
    build_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from wsss.models.checkpoint import META_KEY, file_sha256, read_state_dict

TINY = BackboneConfig("vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2})
CLASSES = ["background", "boat", "train", "cow"]


def _meta(pooling: str = "gmp", classes: list[str] = CLASSES) -> dict:
    return {
        "method": "cam",
        "model": {"backbone": asdict(TINY), "pooling": pooling},
        "class_names": list(classes),
        "iteration": 7,
        "notes": {"nested": [1, 2.5, None]},
    }


def _net(pooling: str = "gmp", num_fg: int = 3, seed: int = 0) -> CAMNet:
    torch.manual_seed(seed)
    return CAMNet(TINY, num_fg, pooling=pooling).eval()


def _tensors() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(6, dtype=torch.float32).view(2, 3), "a.bias": torch.tensor([1.5, -2.0])}


class _Hostile:
    """Pickles to a call of os.system that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ---------------------------------------------------------------------------------------------------- round trips


def test_round_trip_preserves_tensors_and_metadata(tmp_path: Path) -> None:
    net = _net()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.safetensors", net.state_dict(), _meta())
    assert path == tmp_path / "sub" / "ckpt.safetensors" and path.is_file()
    assert not (tmp_path / "sub" / "ckpt.safetensors.tmp").exists()
    state, meta = load_checkpoint(path)
    assert meta == {"package_version": wsss.__version__, **_meta()}
    reference = net.state_dict()
    assert set(state) == set(reference)
    for k, v in reference.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_metadata_cannot_override_version_unless_given(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", _tensors(), {"package_version": "9.9", "x": 1})
    _, meta = load_checkpoint(path)
    assert meta == {"package_version": "9.9", "x": 1}


def test_save_handles_non_contiguous_and_shared_tensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    state = {"t": base.t(), "alias": base, "view": base[1]}  # transposed, shared storage, view
    path = save_checkpoint(tmp_path / "c.safetensors", state, {})
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["alias"], base)
    assert torch.equal(loaded["view"], torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _tensors(), {"step": 1})
    save_checkpoint(path, {"a.weight": torch.zeros(1)}, {"step": 2})
    state, meta = load_checkpoint(path)
    assert meta["step"] == 2 and list(state) == ["a.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    assert len(file_sha256(path)) == 64


@pytest.mark.parametrize("pooling", ["gmp", "gap"])
def test_load_model_reproduces_outputs(tmp_path: Path, pooling: str) -> None:
    net = _net(pooling)
    path = save_checkpoint(tmp_path / "m.safetensors", net.state_dict(), _meta(pooling))
    model, meta = load_model(path)
    assert isinstance(model, CAMNet) and not model.training
    assert model.pooling == pooling and meta["class_names"] == CLASSES and meta["iteration"] == 7
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cams = net(x)
        logits2, cams2 = model(x)
    assert logits.shape == (2, 3) and cams.shape == (2, 3, 4, 5)
    assert torch.equal(logits, logits2) and torch.equal(cams, cams2)
    # a differently initialised network does not give the same outputs (the comparison can fail)
    with torch.no_grad():
        assert not torch.allclose(_net(pooling, seed=1)(x)[0], logits)


def test_build_model(tmp_path: Path) -> None:
    model = build_model("cam", {"backbone": asdict(TINY)}, 5)
    assert isinstance(model, CAMNet) and model.pooling == "gmp"
    assert model.classifier.weight.shape == (5, 48, 1, 1)
    assert build_model("cam", {"backbone": asdict(TINY), "pooling": "gap"}, 2).pooling == "gap"
    with pytest.raises(ValueError, match="unknown method 'fcn'"):
        build_model("fcn", {"backbone": asdict(TINY)}, 5)
    with pytest.raises(ValueError, match="needs a 'cnn' section"):
        build_model("cobra", {"backbone": asdict(TINY)}, 5)
    with pytest.raises(ValueError, match="aux_layer -3 is outside a 1-block encoder"):
        build_model("seco", {"backbone": asdict(TINY)}, 5)


# ------------------------------------------------------------------------------------------------ unreadable files


def _saved(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ok.safetensors", _net().state_dict(), _meta())


@pytest.mark.parametrize("keep", [0.5, 0.99, 16])
def test_truncated_safetensors(tmp_path: Path, keep: float) -> None:
    data = _saved(tmp_path).read_bytes()
    n = int(len(data) * keep) if keep < 1 else int(keep)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(bad)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(bad)


def test_garbage_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for fn in (load_checkpoint, read_state_dict, load_model):
        with pytest.raises(CheckpointError, match="empty file"):
            fn(empty)
        with pytest.raises(CheckpointError, match="no such file"):
            fn(tmp_path / "missing.safetensors")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        read_state_dict(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path)  # a directory is not a checkpoint file


def test_safetensors_without_metadata_block(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(_tensors(), str(path))
    with pytest.raises(CheckpointError, match=f"no '{META_KEY}' metadata block"):
        load_checkpoint(path)
    other = tmp_path / "other_meta.safetensors"
    save_file(_tensors(), str(other), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a wsss checkpoint"):
        load_checkpoint(other)
    # as a foreign weight file it is fine
    state = read_state_dict(path)
    assert torch.equal(state["a.weight"], _tensors()["a.weight"])


def test_metadata_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "badmeta.safetensors"
    save_file(_tensors(), str(path), metadata={META_KEY: "{method: cam"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_load_checkpoint_wants_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(_tensors(), path)
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------- hostile pickles


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw_pickle"])
def test_hostile_pickle_is_refused_without_running_code(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"w": torch.zeros(2), "evil": _Hostile(marker)}
    path = tmp_path / ("model.bin" if fmt == "raw_pickle" else "model.pth")
    if fmt == "zip":
        torch.save(payload, path)
    elif fmt == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_hostile_fixture_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Guard for the test above: the payload is live, so its marker check is meaningful."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Hostile(marker), protocol=2))
    assert marker.exists()


def test_non_tensor_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pth"
    torch.save({"w": torch.zeros(2), "epoch": 3, "name": "x"}, path)
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        read_state_dict(path)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(CheckpointError, match="expected a dict of tensors, found list"):
        read_state_dict(listed)


def test_truncated_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "t.pth"
    torch.save(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


# ---------------------------------------------------------------------------------------------- foreign containers


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "network", "module"])
def test_nested_state_dict_is_unwrapped(tmp_path: Path, wrapper: str) -> None:
    path = tmp_path / "nested.pth"
    torch.save({wrapper: _tensors(), "epoch": 12, "optimizer": {"lr": 0.1}}, path)
    state = read_state_dict(path)
    assert set(state) == {"a.weight", "a.bias"}
    assert torch.equal(state["a.bias"], torch.tensor([1.5, -2.0]))


def test_plain_state_dict(tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    torch.save(_net().state_dict(), plain)  # an OrderedDict
    state = read_state_dict(plain)
    assert set(state) == set(_net().state_dict()) and torch.equal(state["classifier.weight"], _net().classifier.weight)


# ---------------------------------------------------------------------------------------------------- load_model


def test_load_model_rejects_weights_of_another_depth(tmp_path: Path) -> None:
    meta = _meta()
    meta["model"]["backbone"]["overrides"] = {**TINY.overrides, "depth": 2}
    path = save_checkpoint(tmp_path / "m.safetensors", _net().state_dict(), meta)
    with pytest.raises(CheckpointError, match="do not fit") as info:
        load_model(path)
    assert "backbone.blocks.1." in str(info.value)


def test_load_model_rejects_unexpected_weights(tmp_path: Path) -> None:
    state = dict(_net().state_dict(), **{"extra.weight": torch.zeros(3)})
    path = save_checkpoint(tmp_path / "m.safetensors", state, _meta())
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(path)


def test_load_model_rejects_weights_with_the_wrong_class_count(tmp_path: Path) -> None:
    """Metadata naming 2 classes with a 3-class classifier: a CheckpointError, not a bare RuntimeError."""
    path = save_checkpoint(tmp_path / "m.safetensors", _net().state_dict(), _meta(classes=CLASSES[:2]))
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_model(path)


@pytest.mark.parametrize("key", ["method", "model", "class_names"])
def test_load_model_requires_metadata_keys(tmp_path: Path, key: str) -> None:
    meta = copy.deepcopy(_meta())
    del meta[key]
    path = save_checkpoint(tmp_path / "m.safetensors", _net().state_dict(), meta)
    with pytest.raises(CheckpointError, match=f"metadata lacks '{key}'"):
        load_model(path)


def test_metadata_is_stored_as_json_in_the_header(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "m.safetensors", _tensors(), {"k": [1, 2]})
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()[META_KEY]
    assert json.loads(raw) == {"package_version": wsss.__version__, "k": [1, 2]}
