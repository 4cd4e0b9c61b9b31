"""Checkpoints: safetensors round trips with metadata, and every way a weight file can be bad or hostile."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
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
    LoadedModel,
    LoadReport,
    ModelSpec,
    build_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
    spec_from_meta,
)
from wsss.models.checkpoint import META_KEY, file_sha256, read_state_dict

TINY = BackboneConfig("vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2})
CLASSES = ["background", "boat", "train", "cow"]


def _spec(pooling: str = "gmp", classes: list[str] = CLASSES, **backbone) -> ModelSpec:
    return ModelSpec("cam", {"backbone": {**asdict(TINY), **backbone}, "pooling": pooling}, tuple(classes))


def _meta(pooling: str = "gmp", classes: list[str] = CLASSES) -> dict:
    """Metadata as training writes it: the spec, plus anything else (kept as is)."""
    return {"spec": _spec(pooling, classes).to_dict(), "iteration": 7, "notes": {"nested": [1, 2.5, None]}}


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
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel)
    model, meta = loaded.model, loaded.meta
    assert isinstance(model, CAMNet) and not model.training
    assert loaded.spec == _spec(pooling) and model.spec == loaded.spec
    assert loaded.spec.class_names == tuple(CLASSES) and spec_from_meta(meta) == loaded.spec
    assert model.pooling == pooling and meta["iteration"] == 7 and meta["source_sha256"] == file_sha256(path)
    assert isinstance(loaded.report, LoadReport) and loaded.report.layout == "wsss"
    assert loaded.report.loaded == len(net.state_dict()) and not loaded.report.missing
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
    five = ("background", "a", "b", "c", "d", "e")
    spec = ModelSpec("cam", {"backbone": asdict(TINY)}, five)
    model = build_model(spec)
    assert isinstance(model, CAMNet) and model.pooling == "gmp" and model.spec is spec
    assert model.classifier.weight.shape == (5, 48, 1, 1)
    assert build_model(ModelSpec("cam", {"backbone": asdict(TINY), "pooling": "gap"}, five[:3])).pooling == "gap"
    with pytest.raises(ValueError, match="unknown model family 'fcn'"):
        ModelSpec("fcn", {"backbone": asdict(TINY)}, five)
    with pytest.raises(ValueError, match="needs a 'cnn' section"):
        build_model(ModelSpec("cobra", {"backbone": asdict(TINY)}, five))
    with pytest.raises(ValueError, match="aux_layer -3 is outside a 1-block encoder"):
        build_model(ModelSpec("seco", {"backbone": asdict(TINY)}, five))


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
    with pytest.raises(CheckpointError, match="is a directory"):
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


def _refused(fn, path: Path, *causes: str) -> str:
    """``fn(path)`` fails with one line naming the file and each cause, and never advises weights_only=False."""
    with pytest.raises(CheckpointError) as info:
        fn(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "weights_only=False" not in msg, msg
    for cause in causes:
        assert cause in msg, msg
    return msg


def _noise(n: int = 4096) -> bytes:
    return b"\x07" + random.Random(0).randbytes(n - 1)  # no magic: not safetensors, zip or pickle


@pytest.mark.parametrize("fn", [load_checkpoint, read_state_dict])
@pytest.mark.parametrize("name", ["noise.pth", "noise.safetensors"])
def test_random_bytes(tmp_path: Path, fn, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(_noise())
    _refused(fn, path, "truncated or corrupt", "unknown format")


@pytest.mark.parametrize("fn", [load_checkpoint, read_state_dict])
def test_missing_directory_and_empty_are_one_line(tmp_path: Path, fn) -> None:
    _refused(fn, tmp_path / "missing.safetensors", "no such file")
    _refused(fn, tmp_path, "is a directory")
    (tmp_path / "empty.pth").write_bytes(b"")
    _refused(fn, tmp_path / "empty.pth", "empty file")


@pytest.mark.parametrize("fn", [load_checkpoint, read_state_dict])
def test_cut_safetensors_names_its_format(tmp_path: Path, fn) -> None:
    data = _saved(tmp_path).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    _refused(fn, path, "truncated or corrupt", "safetensors")


@pytest.mark.parametrize("legacy", [False, True])
def test_cut_torch_file_names_its_format(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "cut.pth"
    torch.save(_net().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fmt = "legacy torch pickle" if legacy else "torch zip"
    _refused(read_state_dict, path, "truncated or corrupt", fmt)
    _refused(load_checkpoint, path, fmt, "not a wsss checkpoint", ".safetensors")


@pytest.mark.parametrize(
    ("data", "looks"),
    [
        (b"\x89PNG\r\n\x1a\n" + _noise(64), "a PNG image"),
        (b"\xff\xd8\xff\xe0" + _noise(64), "a JPEG image"),
        (b"epoch,loss\n1,0.5\n", "a text file"),
        (b'  {"state_dict": {"a": [1, 2]}}', "a JSON file"),
        (b"<!DOCTYPE html><html><body>Not Found</body></html>", "an HTML or XML page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n", "a Git LFS pointer"),
    ],
)
@pytest.mark.parametrize("fn", [load_checkpoint, read_state_dict])
def test_not_a_checkpoint_says_what_it_looks_like(tmp_path: Path, fn, data: bytes, looks: str) -> None:
    for name in ("weights.safetensors", "weights.pth"):
        path = tmp_path / name
        path.write_bytes(data)
        _refused(fn, path, "not a checkpoint", looks)


def test_safetensors_is_recognised_by_content(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, _tensors(), {"x": 1})
    assert load_checkpoint(path)[1]["x"] == 1
    assert torch.equal(read_state_dict(path)["a.bias"], _tensors()["a.bias"])


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
    # a bare pickle of a tensor imports torch.storage._load_from_bytes, itself an unrestricted torch.load
    name = "torch.storage._load_from_bytes" if fmt == "raw_pickle" else f"{os.system.__module__}.system"
    _refused(read_state_dict, path, "holds code", f"`{name}`")
    assert not marker.exists()


class _Calls:
    """Pickles to ``func(*args)``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker: Path) -> dict[str, tuple[_Calls, str]]:
    return {  # what the pickle calls, and the name the error must give
        "io.open": (_Calls(io.open, "/nonexistent"), "io.open"),
        "os.system": (_Calls(os.system, f"touch '{marker}'"), f"{os.system.__module__}.system"),  # posix.system
        "eval": (_Calls(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"), "builtins.eval"),
        "torch.load": (_Calls(torch.load, "/nonexistent"), "torch.serialization.load"),  # named from torch's text
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")
@pytest.mark.parametrize("fmt", ["zip", "legacy", "legacy_cut", "pickle_v5"])
@pytest.mark.parametrize("call", ["io.open", "os.system", "eval", "torch.load"])
def test_hostile_pickle_names_the_callable(tmp_path: Path, fmt: str, call: str) -> None:
    marker = tmp_path / "pwned"
    hostile, name = _payloads(marker)[call]
    payload = {"w": torch.zeros(256), "evil": hostile}
    path = tmp_path / "model.pth"
    if fmt == "pickle_v5":  # STACK_GLOBAL with memoised strings instead of GLOBAL; no tensor (see above)
        path.write_bytes(pickle.dumps({"w": [1.0], "evil": hostile}, protocol=5))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")
    if fmt == "legacy_cut":  # found even when the tensor bytes after the pickle are cut off
        path.write_bytes(path.read_bytes()[:-512])
    msg = _refused(read_state_dict, path, "holds code", f"`{name}`", "refused", "safetensors")
    assert "when loaded" in msg
    assert not marker.exists()


def test_hostile_fixture_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Guard for the test above: the payload is live, so its marker check is meaningful."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Hostile(marker), protocol=2))
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(_payloads(marker)["eval"][0], protocol=2))
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
    meta["spec"] = _spec(overrides={**TINY.overrides, "depth": 2}).to_dict()
    path = save_checkpoint(tmp_path / "m.safetensors", _net().state_dict(), meta)
    with pytest.raises(CheckpointError, match="do not fit") as info:
        load_model(path)
    assert "backbone.blocks.1." in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_model_rejects_unexpected_weights(tmp_path: Path) -> None:
    state = dict(_net().state_dict(), **{"extra.weight": torch.zeros(3)})
    path = save_checkpoint(tmp_path / "m.safetensors", state, _meta())
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): extra\.weight"):
        load_model(path)


def test_load_model_rejects_weights_with_the_wrong_class_count(tmp_path: Path) -> None:
    """A spec naming 2 classes with a 3-class classifier: a CheckpointError, not a bare RuntimeError."""
    path = save_checkpoint(tmp_path / "m.safetensors", _net().state_dict(), _meta(classes=CLASSES[:2]))
    with pytest.raises(CheckpointError, match=r"classifier\.weight \(3, 48, 1, 1\) != \(1, 48, 1, 1\)"):
        load_model(path)


@pytest.mark.parametrize("key", ["family", "arch", "class_names"])
def test_load_model_requires_spec_keys(tmp_path: Path, key: str) -> None:
    meta = copy.deepcopy(_meta())
    del meta["spec"][key]
    path = save_checkpoint(tmp_path / "m.safetensors", _net().state_dict(), meta)
    with pytest.raises(CheckpointError, match=rf"model spec in the metadata is invalid: .*needs \['{key}'\]"):
        load_model(path)


def test_load_model_requires_a_spec(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", _net().state_dict(), {"iteration": 7})
    with pytest.raises(CheckpointError, match="holds no model spec") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_load_model_refuses_a_vit_partner_for_a_wsss_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", _net().state_dict(), _meta())
    with pytest.raises(CheckpointError, match="official CoBra pairs only"):
        load_model(path, vit_path=path)


def test_save_model_writes_the_spec_and_extra_metadata(tmp_path: Path) -> None:
    net, spec = _net(), _spec()
    path = save_model(tmp_path / "m.safetensors", net, spec, step=3, seed=1)
    _, meta = load_checkpoint(path)
    assert meta["spec"] == spec.to_dict() and meta["step"] == 3 and meta["seed"] == 1
    assert not {"method", "model", "class_names", "mean", "std"} & set(meta)  # the spec holds them
    assert spec_from_meta(meta) == spec
    again = load_model(path)
    x = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(net(x), again.model(x), strict=True):
            assert torch.equal(a, b)


def test_metadata_is_stored_as_json_in_the_header(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "m.safetensors", _tensors(), {"k": [1, 2]})
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()[META_KEY]
    assert json.loads(raw) == {"package_version": wsss.__version__, "k": [1, 2]}
