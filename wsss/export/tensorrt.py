"""TensorRT engines from our ONNX files (TensorRT Python API), with a JSON sidecar and a runner.

Engines stay raw (trtexec and C++ loaders read them); the ONNX file's metadata (the model spec as a JSON object,
the outputs, version, source SHA-256), the TensorRT version and the GPU name go to ``ENGINE.json``. An engine is
refused on another TensorRT version or GPU, since it would not load or be slow.
Needs a CUDA GPU and ``pip install 'wsss[gpu]'``; nothing here runs on a CPU-only machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .onnx import INPUT, parse_metadata, read_metadata

INSTALL_HINT = "TensorRT is not installed: pip install 'wsss[gpu]' (tensorrt, onnxruntime-gpu) on a CUDA machine"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise RuntimeError(INSTALL_HINT) from err
    return trt


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (B, 3, H, W) shapes, H and W at least the patch size."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"1x3x448x448"`` -> (1, 3, 448, 448)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        raise ValueError(f"shape must look like BATCHx3xHEIGHTxWIDTH, e.g. 1x3x448x448; got {text!r}")
    return shape


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profile: Profile,
    fp16: bool = False,
    workspace_gib: float = 4.0,
    timing_cache: str | Path | None = None,
) -> Path:
    """Parse ``onnx_path``, build a serialized engine for ``profile`` and write it with its sidecar."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT >= 10 networks are explicit-batch only; older releases need the flag.
    flags = (
        0 if int(trt.__version__.split(".")[0]) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    )
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11: precision comes from a strongly typed network
            raise RuntimeError("this TensorRT has no FP16 builder flag; export the ONNX in half precision instead")
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    opt.set_shape(INPUT, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    spec, props = read_metadata(onnx_path)
    sidecar = {
        "spec": spec.to_dict(), **props, "tensorrt": trt.__version__, "gpu": gpu_name(), "fp16": fp16,
        "profile": {"min": profile.min, "opt": profile.opt, "max": profile.max}, "onnx": str(onnx_path),
    }  # fmt: skip
    engine_path.with_suffix(engine_path.suffix + ".json").write_text(json.dumps(sidecar, indent=2))
    return engine_path


class EngineRunner:
    """Runs an engine on CUDA tensors; refuses engines built for another TensorRT or GPU. ``spec`` and ``meta``
    (outputs, version, source SHA-256, TensorRT, GPU, profile) come from the sidecar."""

    def __init__(self, engine_path: str | Path):
        import torch

        trt = import_tensorrt()
        engine_path = Path(engine_path)
        sidecar_path = engine_path.with_suffix(engine_path.suffix + ".json")
        if not sidecar_path.is_file():
            raise RuntimeError(f"{engine_path}: missing sidecar {sidecar_path.name} (export with wsss-export --trt)")
        self.spec, self.meta = parse_metadata(json.loads(sidecar_path.read_text()), sidecar_path)
        for key, now in (("tensorrt", trt.__version__), ("gpu", gpu_name())):
            if self.meta.get(key) != now:
                raise RuntimeError(f"{engine_path}: built for {key} {self.meta.get(key)!r}, this machine has {now!r}; "
                                   "rebuild it with wsss-export --trt")  # fmt: skip
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.outputs: list[str] = self.meta["outputs"]
        self.torch = torch

    def __call__(self, image) -> list:
        """``image`` (B, 3, H, W) float32 CUDA tensor -> outputs as CUDA tensors, in ``self.outputs`` order."""
        torch = self.torch
        image = image.contiguous().float()
        self.context.set_input_shape(INPUT, tuple(image.shape))
        self.context.set_tensor_address(INPUT, image.data_ptr())
        results = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), device=image.device, dtype=torch.float32)
            self.context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return results


def verify_engine(engine_path: str | Path, onnx_path: str | Path, shapes: list[tuple[int, ...]]) -> list[dict]:
    """Max abs / scale-relative difference between the engine and ONNX Runtime on the same inputs."""
    import torch

    from .onnx import onnx_session

    runner = EngineRunner(engine_path)
    session = onnx_session(onnx_path, ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    rows = []
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        want = session.run(runner.outputs, {INPUT: x})
        got = [t.cpu().numpy() for t in runner(torch.from_numpy(x).cuda())]
        for name, a, b in zip(runner.outputs, want, got, strict=True):
            err = float(np.abs(a - b).max())
            rows.append({"shape": "x".join(map(str, shape)), "output": name, "max_abs": err,
                         "max_rel": err / (float(np.abs(a).max()) or 1.0)})  # fmt: skip
    return rows
