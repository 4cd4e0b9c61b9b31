"""The TensorRT runner against a fake engine (TensorRT is absent here): batches split to the profile, sizes outside it
refused in one line, ``set_input_shape`` checked, dtypes from the engine, unloadable engines, ``verify_engine``
failing on NaN/Inf and on errors above the precision's tolerance, and the default profiles serving the labeler.

The fake reads and writes the tensors at the addresses the runner binds (ctypes, CPU memory), so a wrong dtype,
shape or address gives wrong numbers, as it would on a GPU."""

from __future__ import annotations

import ctypes
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsss.export.tensorrt import (
    ENGINE_TOLERANCE,
    EngineRunner,
    Profile,
    ProfileError,
    export_profile,
    label_profile,
    verify_engine,
)
from wsss.models import CAMSettings, ModelSpec

PATCH, K = 8, 3
OUTPUTS = ["logits", "cams"]
NP = {"FLOAT": np.float32, "HALF": np.float16}


def reference(x: np.ndarray) -> list[np.ndarray]:
    """What the fake network computes: per-channel means and ``PATCH`` x ``PATCH`` average-pooled CAMs."""
    b, _, h, w = x.shape
    hc, wc = h // PATCH, w // PATCH
    cams = x[:, :, : hc * PATCH, : wc * PATCH].reshape(b, K, hc, PATCH, wc, PATCH).mean((3, 5))
    return [x.mean((2, 3)), cams]


def _view(address: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_byte * n).from_address(address), dtype=dtype).reshape(shape)


class FakeEngine:
    def __init__(self, profile: Profile, dtype: str = "FLOAT", refuse=(), nan: bool = False):
        self.profile, self.dtype, self.refuse, self.nan = profile, dtype, set(refuse), nan
        self.contexts: list[FakeContext] = []

    def get_tensor_profile_shape(self, name: str, index: int):
        assert (name, index) == ("image", 0)
        return [list(self.profile.min), list(self.profile.opt), list(self.profile.max)]

    def get_tensor_dtype(self, name: str):
        return SimpleNamespace(name=self.dtype)

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.addresses, self.shape, self.calls = engine, {}, None, []

    def set_input_shape(self, name: str, shape) -> bool:
        p = self.engine.profile
        ok = all(a <= s <= b for a, s, b in zip(p.min, shape, p.max, strict=True)) and shape not in self.engine.refuse
        self.shape = shape if ok else None
        return ok

    def get_tensor_shape(self, name: str):
        b, _, h, w = self.shape
        return (b, K) if name == "logits" else (b, K, h // PATCH, w // PATCH)

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def execute_async_v3(self, stream: int) -> bool:
        self.calls.append((self.shape, stream))
        dtype = NP[self.engine.dtype]
        x = _view(self.addresses["image"], self.shape, dtype).astype(np.float32)
        for name, value in zip(OUTPUTS, reference(x), strict=True):
            _view(self.addresses[name], value.shape, dtype)[...] = np.nan if self.engine.nan else value
        return True


def _spec() -> ModelSpec:
    backbone = {"name": "vit_tiny_patch16_224", "img_size": 32, "overrides": {"patch_size": PATCH}}
    return ModelSpec("cam", {"backbone": backbone}, ("background", "a", "b", "c"),
                     CAMSettings.for_family("cam", {"input_size": 32, "scales": [1.0]}))  # fmt: skip


PROFILE = Profile((1, 3, 16, 16), (2, 3, 32, 32), (4, 3, 64, 64))


def _runner(engine: FakeEngine, fp16: bool = False) -> EngineRunner:
    return EngineRunner(engine, _spec(), {"outputs": OUTPUTS, "fp16": fp16}, "cpu", "m.engine")


def test_batches_beyond_the_profile_run_in_chunks_and_concatenate():
    engine = FakeEngine(PROFILE)
    x = torch.randn(10, 3, 37, 45)  # the labeler's flips doubled 5 images; the profile takes 4 at a time
    got = _runner(engine)(x)
    assert [shape[0] for shape, _ in engine.contexts[0].calls] == [4, 4, 2]
    for a, b in zip(got, reference(x.numpy()), strict=True):
        assert a.dtype == torch.float32
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-6)


def test_sizes_outside_the_profile_are_refused_naming_the_export_option():
    with pytest.raises(ProfileError, match=r"m.engine: input 100x40 is outside the TensorRT profile \(min 1x3x16x16, "
                       r"opt 2x3x32x32, max 4x3x64x64\); .*--max-shape 4x3x100x64"):  # fmt: skip
        _runner(FakeEngine(PROFILE))(torch.randn(2, 3, 100, 40))
    with pytest.raises(ProfileError, match="below the TensorRT profile's minimum batch"):
        _runner(FakeEngine(Profile((2, 3, 16, 16), (2, 3, 32, 32), (4, 3, 64, 64))))(torch.randn(5, 3, 32, 32))


def test_a_shape_the_context_refuses_is_reported_against_the_profile():
    engine = FakeEngine(PROFILE, refuse={(2, 3, 32, 40)})
    with pytest.raises(ProfileError, match=r"refused input shape 2x3x32x40 \(profile min 1x3x16x16, opt 2x3x32x32, "
                       r"max 4x3x64x64\)"):  # fmt: skip
        _runner(engine)(torch.randn(2, 3, 32, 40))


def test_input_and_output_dtypes_come_from_the_engine():
    x = torch.randn(3, 3, 32, 48)
    got = _runner(FakeEngine(PROFILE, dtype="HALF"))(x)  # a float32 buffer read as half would be noise
    for a, b in zip(got, reference(x.half().float().numpy()), strict=True):
        assert a.dtype == torch.float32
        np.testing.assert_allclose(a.numpy(), b, rtol=2e-3, atol=2e-3)


class FakeTensorRT:
    __version__ = "10.9"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return None  # what TensorRT returns for an engine of another version or GPU, or a corrupt file


def test_an_engine_tensorrt_cannot_load_is_refused_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "m.engine"
    path.write_bytes(b"\x00not an engine")
    sidecar = {"spec": _spec().to_dict(), "outputs": OUTPUTS, "tensorrt": "10.9", "gpu": "none"}
    (tmp_path / "m.engine.json").write_text(json.dumps(sidecar))
    monkeypatch.setattr("wsss.export.tensorrt.import_tensorrt", lambda: FakeTensorRT)
    with pytest.raises(RuntimeError) as err:
        EngineRunner.open(path, "cpu")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: TensorRT 10.9 could not load the engine")
    assert "another TensorRT version or for another GPU" in message and "corrupt" in message


class FakeSession:
    """ONNX Runtime's ``run`` interface, the reference network scaled by ``1 + error``."""

    def __init__(self, error: float = 0.0):
        self.error = error

    def run(self, names, feeds):
        assert names == OUTPUTS
        return [a * (1 + self.error) for a in reference(feeds["image"])]


def test_verify_engine_checks_min_opt_and_max_and_fails_by_precision():
    runner = _runner(FakeEngine(PROFILE))
    rows = verify_engine(runner, FakeSession(), [PROFILE.min, PROFILE.opt, PROFILE.max])
    assert {r["shape"] for r in rows} == {"1x3x16x16", "2x3x32x32", "4x3x64x64"} and len(rows) == 6
    assert max(r["max_rel"] for r in rows) < 1e-6
    error = (ENGINE_TOLERANCE["fp32"] + ENGINE_TOLERANCE["fp16"]) / 2  # too large for fp32, fine for fp16
    with pytest.raises(RuntimeError, match=r"m.engine: the fp32 engine differs from ONNX Runtime by .* > 0.001"):
        verify_engine(runner, FakeSession(error), [PROFILE.opt])
    verify_engine(_runner(FakeEngine(PROFILE), fp16=True), FakeSession(error), [PROFILE.opt])
    with pytest.raises(RuntimeError, match="the fp16 engine gives NaN/Inf in output logits at 2x3x32x32"):
        verify_engine(_runner(FakeEngine(PROFILE, nan=True), fp16=True), FakeSession(), [PROFILE.opt])


def test_default_profiles_serve_the_labeler():
    seco = _spec().replace(cam=CAMSettings.for_family("seco", {"input_size": 448, "scales": [1.0, 0.5, 0.75, 1.5]}))
    assert label_profile(seco) == Profile((1, 3, 224, 224), (16, 3, 448, 448), (16, 3, 672, 672))
    cobra = _spec().replace(cam=CAMSettings.for_family("cobra", {}))  # native size, scales 0.5 .. 2.0, flips
    assert label_profile(cobra) == Profile((1, 3, PATCH, PATCH), (4, 3, 500, 500), (4, 3, 1000, 1000))
    assert export_profile(seco, (None, None, (32, 3, 672, 672)), dynamic=True).max == (32, 3, 672, 672)
    assert export_profile(seco, (None, None, None), dynamic=False) == Profile(*[(2, 3, 448, 448)] * 3)
    with pytest.raises(ValueError, match="need min <= opt <= max"):
        Profile((1, 3, 64, 64), (1, 3, 32, 32), (1, 3, 64, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the runner's own CUDA stream needs a GPU")
def test_the_runner_launches_on_its_own_stream_after_the_current_one():
    engine = FakeEngine(PROFILE)
    runner = EngineRunner(engine, _spec(), {"outputs": OUTPUTS}, "cuda", "m.engine")
    context = engine.contexts[0]
    context.execute_async_v3 = lambda stream: context.calls.append((context.shape, stream)) or True  # no compute
    runner(torch.randn(2, 3, 32, 32, device="cuda"))
    stream = context.calls[0][1]
    assert stream == runner.stream.cuda_stream and stream != torch.cuda.current_stream().cuda_stream
