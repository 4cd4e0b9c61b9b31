"""Backends and devices without a GPU: ``--device cuda:N`` refused in one line where there is no GPU N, ONNX Runtime
provider options per device (``device_id``, TF32 off, the TensorRT provider's cache, fp16 and profile), a provider
that fails to load refused (fake session), IO binding against a plain ``session.run``, precision per backend, and
exports traced from a CPU copy of a network that sits elsewhere."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import wsss.export.onnx as onnx_module
from wsss.export.onnx import on_cpu, onnx_session, ort_providers
from wsss.export.tensorrt import Profile, ort_tensorrt_options
from wsss.models import CAMSettings, ModelSpec, build_model
from wsss.runtime.backends import OnnxBackend, TorchBackend, select_device

CLASSES = ("background", "a", "b", "c")
TINY = {"name": "vit_tiny_patch16_224", "img_size": 32, "overrides": {"patch_size": 8, "depth": 1, "embed_dim": 24,
                                                                        "num_heads": 2}}  # fmt: skip
SPEC = ModelSpec("cam", {"backbone": TINY}, CLASSES, CAMSettings.for_family("cam", {"input_size": 32, "scales": [1]}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_missing_gpu_is_refused_in_one_line():
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device cuda:1: no CUDA GPU is visible .*; use --device cpu$"):
        select_device("cuda:1")


def test_provider_options_follow_the_device():
    assert ort_providers("cpu") == [("CPUExecutionProvider", {})]
    cuda, cpu = ort_providers(torch.device("cuda:1"))
    assert cuda == ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"}) and cpu[0] == "CPUExecutionProvider"
    profile = Profile((1, 3, 224, 224), (16, 3, 448, 448), (16, 3, 672, 672))
    trt = ort_tensorrt_options("models/cam.onnx", profile, fp16=True)
    assert trt == {"trt_engine_cache_enable": "True", "trt_engine_cache_path": "models/cam.trt-cache",
                   "trt_fp16_enable": "True", "trt_profile_min_shapes": "image:1x3x224x224",
                   "trt_profile_opt_shapes": "image:16x3x448x448",
                   "trt_profile_max_shapes": "image:16x3x672x672"}  # fmt: skip
    names = [name for name, _ in ort_providers("cuda:2", trt)]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("cuda:2", trt)[0][1]["device_id"] == "2"


class FakeSession:
    """``InferenceSession`` that records its arguments and, like ONNX Runtime when a CUDA library is missing, starts
    on the CPU only."""

    made: list[dict] = []

    def __init__(self, path, providers, provider_options):
        FakeSession.made.append({"providers": providers, "options": provider_options})

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_a_provider_that_fails_to_load_is_an_error_not_a_cpu_run(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"^m.onnx: ONNX Runtime could not start CUDAExecutionProvider and would "
                       r"run on CPUExecutionProvider: .*--device cpu$"):  # fmt: skip
        onnx_session("m.onnx", ort_providers("cuda:1"))
    assert FakeSession.made[-1]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert FakeSession.made[-1]["options"][0] == {"device_id": "1", "use_tf32": "0"}
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # CPU-only onnxruntime
    with pytest.raises(
        RuntimeError, match=r"has no CUDAExecutionProvider: pip install 'wsss\[cpu\]' \(or 'wsss\[gpu\]"
    ):
        onnx_session("m.onnx", ort_providers("cuda"))


def _pooling_graph(path) -> None:
    """A CAM graph with the spec in its metadata: logits = channel means, cams = 8 x 8 average pooling."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, "H", "W"])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("logits", "cams")]
    nodes = [helper.make_node("ReduceMean", ["image", "axes"], ["logits"], keepdims=0),
             helper.make_node("AveragePool", ["image"], ["cams"], kernel_shape=[8, 8], strides=[8, 8])]  # fmt: skip
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    model = helper.make_model(helper.make_graph(nodes, "pool", [image], outs, [axes]),
                              opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    helper.set_model_props(model, {"spec": json.dumps(SPEC.to_dict()), "outputs": json.dumps(["logits", "cams"])})
    onnx.save(model, str(path))


def test_io_binding_matches_a_plain_session_run(tmp_path):
    path = tmp_path / "pool.onnx"
    _pooling_graph(path)
    backend = OnnxBackend(path)
    x = torch.randn(3, 3, 37, 45)
    want = onnx_session(path).run(["logits", "cams"], {"image": x.numpy()})
    got = backend(x)
    assert [t.shape for t in got] == [(3, 3), (3, 3, 4, 5)]
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, torch.Tensor) and a.device == backend.device
        np.testing.assert_array_equal(a.numpy(), b)
    again = backend(torch.zeros(1, 3, 16, 16))  # a second run leaves the first outputs alone
    assert again[0].abs().max() == 0 and np.array_equal(got[1].numpy(), want[1])
    with pytest.raises(ValueError, match="fp16 needs --backend onnx-trt"):
        backend.at_precision("fp16")
    with pytest.raises(ValueError, match="onnx-trt runs on CUDA devices only"):
        OnnxBackend(path, tensorrt=True)


def test_torch_precision_wraps_the_network_only_and_refuses_cpu_fp16():
    torch.manual_seed(0)
    backend = TorchBackend(build_model(SPEC))
    with pytest.raises(ValueError, match="fp16 runs on CUDA devices only"):
        backend.at_precision("fp16")
    x = torch.randn(2, 3, 32, 40)
    bf16 = backend.at_precision("bf16")
    want, got = backend(x), bf16(x)
    assert backend.precision == "fp32" and bf16.model is backend.model
    for a, b in zip(want, got, strict=True):
        assert b.dtype == torch.float32 and not torch.equal(a, b)  # bf16 rounding shows, the results stay float32
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05 * float(a.abs().max()))


def test_exports_trace_a_cpu_copy_of_a_network_elsewhere(monkeypatch):
    model = build_model(SPEC)
    assert on_cpu(model) is model
    copies, replica = [], build_model(SPEC)
    elsewhere = build_model(SPEC).to("meta")  # stands in for a network on a GPU (meta tensors have no data to copy)
    monkeypatch.setattr(onnx_module.copy, "deepcopy", lambda m: copies.append(m) or replica)
    traced = on_cpu(elsewhere)
    assert copies == [elsewhere] and next(traced.parameters()).device.type == "cpu"
    assert next(elsewhere.parameters()).device.type == "meta"  # the original stays where it runs


def _gpu_onnx(tmp_path, provider: str):
    """The pooling graph, where a CUDA GPU and ONNX Runtime's ``provider`` are present (else the test skips)."""
    if not torch.cuda.is_available():
        pytest.skip("ONNX Runtime's GPU providers need a CUDA GPU; none on this machine")
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {provider}: pip install 'wsss[gpu]'")
    path = tmp_path / "pool.onnx"
    _pooling_graph(path)
    return path


@pytest.mark.gpu  # skips without a GPU and the provider (_gpu_onnx)
def test_cuda_provider_binds_device_memory_and_matches_the_cpu(tmp_path):
    path = _gpu_onnx(tmp_path, "CUDAExecutionProvider")
    backend = OnnxBackend(path, select_device("cuda"))
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider"
    x = torch.randn(3, 3, 37, 45, device="cuda")
    for a, b in zip(backend(x), OnnxBackend(path)(x.cpu()), strict=True):
        assert a.device == x.device
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu  # skips without a GPU and the provider (_gpu_onnx)
def test_tensorrt_provider_caches_its_engine_and_splits_batches_to_its_profile(tmp_path):
    path = _gpu_onnx(tmp_path, "TensorrtExecutionProvider")
    backend = OnnxBackend(path, "cuda", tensorrt=True, cache_dir=tmp_path / "cache")
    assert backend.session.get_providers()[0] == "TensorrtExecutionProvider"
    x = torch.randn(40, 3, 32, 32, device="cuda")  # the default profile takes 16 (8 images and their flips)
    for a, b in zip(backend(x), OnnxBackend(path)(x.cpu()), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
    assert any((tmp_path / "cache").iterdir())
    with pytest.raises(ValueError, match="outside the TensorRT profile"):
        backend(torch.randn(1, 3, 48, 48, device="cuda"))
