"""TensorRT engines from our ONNX files (TensorRT Python API), with a JSON sidecar and a runner.

Engines stay raw (trtexec and C++ loaders read them); the ONNX file's metadata (the model spec as a JSON object,
the outputs, version, source SHA-256), the TensorRT version, the GPU name, the precision and the profile go to
``ENGINE.json``. An engine is refused on another TensorRT version or GPU, since it would not load or be slow.
Needs a CUDA GPU and ``pip install 'wsss[gpu]'``; the runner's logic (profile checks, batch splitting, dtypes) is
tested against a fake engine where TensorRT is absent.

Profiles: ``label_profile`` derives the default from the spec's CAM settings, so that an engine serves ``wsss label``
as exported. The runners split a batch larger than the profile's maximum (the labeler's flips double it) into
chunks that fit and refuse an image size outside it in one line that names the export option to change.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cam.pipeline import pyramid_sizes
from ..models.spec import ModelSpec
from .onnx import EXAMPLE_BATCH, INPUT, errors, parse_metadata, read_metadata, reference_size

INSTALL_HINT = "TensorRT is not installed: pip install 'wsss[gpu]' (tensorrt, onnxruntime-gpu) on a CUDA machine"
LABEL_BATCH = 8  # images per labeler pass a default fixed-size profile serves at once (flips double it)
NATIVE_BATCH = 2  # the same at native size, where each pass holds images of one shape only
NATIVE_SIDE = 500  # the longest side a default native-size profile serves at scale 1.0 (VOC; COCO needs --max-shape)
ENGINE_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}  # max |TensorRT - ORT| relative to the output's max magnitude
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}  # fmt: skip


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise RuntimeError(INSTALL_HINT) from err
    return trt


class ProfileError(ValueError):
    """An input the engine's optimisation profile cannot take."""


def dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (B, 3, H, W) shapes, H and W at least the patch size."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def __post_init__(self):
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(f"TensorRT profile {self}: need min <= opt <= max in every dimension")

    def __str__(self) -> str:
        return f"min {dims(self.min)}, opt {dims(self.opt)}, max {dims(self.max)}"

    def split(self, x: torch.Tensor, source, fix: str | None = None) -> tuple[torch.Tensor, ...]:
        """``x`` in chunks of at most the maximum batch; an image size outside the profile is refused, with ``fix``
        (default: the export options that widen the profile)."""
        _, _, h, w = x.shape
        (lo_h, lo_w), (hi_h, hi_w) = self.min[2:], self.max[2:]
        if not (lo_h <= h <= hi_h and lo_w <= w <= hi_w):
            fix = fix or (f"export again with --min-shape / --max-shape covering it, e.g. --max-shape "
                          f"{self.max[0]}x3x{max(h, hi_h)}x{max(w, hi_w)}")  # fmt: skip
            raise ProfileError(f"{source}: input {h}x{w} is outside the TensorRT profile ({self}); {fix}")
        chunks = x.split(self.max[0])
        if chunks[-1].shape[0] < self.min[0]:
            raise ProfileError(f"{source}: a pass of {chunks[-1].shape[0]} images is below the TensorRT profile's "
                               f"minimum batch ({self}); export again with --min-shape 1x3x{lo_h}x{lo_w}")  # fmt: skip
        return chunks


def run_chunks(run: Callable[[torch.Tensor], list[torch.Tensor]], chunks) -> list[torch.Tensor]:
    """``run`` on each chunk of a batch, its outputs concatenated along the batch."""
    parts = [run(chunk) for chunk in chunks]
    return [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts, strict=True)]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"1x3x448x448"`` -> (1, 3, 448, 448)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        raise ValueError(f"shape must look like BATCHx3xHEIGHTxWIDTH, e.g. 1x3x448x448; got {text!r}")
    return shape


def label_profile(spec: ModelSpec, batch: int | None = None) -> Profile:
    """The profile that serves ``wsss label`` with the spec's CAM settings, flips doubling ``batch``.

    At a fixed ``input_size`` S: every pyramid size (min: the smallest scale, opt: S, max: the largest scale) and
    ``batch`` images (default ``LABEL_BATCH``). At native size (CoBra): images up to ``NATIVE_SIDE`` a side at every
    scale (scales up to 2.0: 1000 x 1000) down to one patch, ``batch`` default ``NATIVE_BATCH``; larger images need
    an explicit --max-shape. Larger batches are split by the runners, never refused.
    """
    cam, patch = spec.cam, spec.patch_size
    side = cam.input_size or NATIVE_SIDE
    n = (batch or (LABEL_BATCH if cam.input_size else NATIVE_BATCH)) * (2 if cam.flip else 1)
    sides = [s for size in pyramid_sizes((side, side), cam) for s in size]
    low = max(min(sides), patch) if cam.input_size else patch
    high = max(max(sides), low)
    mid = min(max(side, low), high)
    return Profile((1, 3, low, low), (n, 3, mid, mid), (n, 3, high, high))


def export_profile(spec: ModelSpec, given: tuple[tuple[int, int, int, int] | None, ...], dynamic: bool) -> Profile:
    """An export's profile: ``label_profile`` (a static graph: its one input shape), each given shape in place."""
    s = reference_size(spec)
    default = label_profile(spec) if dynamic else Profile(*[(EXAMPLE_BATCH, 3, s, s)] * 3)
    return Profile(*(g or d for g, d in zip(given, (default.min, default.opt, default.max), strict=True)))


def ort_tensorrt_options(onnx_path: str | Path, profile: Profile, fp16: bool = False,
                         cache_dir: str | Path | None = None) -> dict[str, str]:  # fmt: skip
    """Options of ONNX Runtime's TensorRT provider: engines cached in ``cache_dir`` (default ``NAME.trt-cache``
    next to the .onnx; ONNX Runtime rebuilds when the graph, profile or precision changes), fp16, and one explicit
    profile, so that shapes inside it reuse one engine instead of each building its own."""
    cache = Path(cache_dir) if cache_dir else Path(onnx_path).with_suffix(".trt-cache")
    shapes = {f"trt_profile_{k}_shapes": f"{INPUT}:{dims(getattr(profile, k))}" for k in ("min", "opt", "max")}
    return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache), "trt_fp16_enable": str(fp16),
            **shapes}  # fmt: skip


def gpu_name(device: torch.device | str | None = None) -> str:
    """The name of ``device`` (default: the current GPU); "none" off CUDA."""
    device = torch.device(device or "cuda")
    return torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else "none"


def device_scope(device: torch.device):
    """``device`` as the current CUDA device (TensorRT loads and runs there); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


@contextmanager
def side_stream(stream: torch.cuda.Stream | None) -> Iterator[int]:
    """The handle of ``stream``, for work ordered after the current stream's work so far and before its later work
    (the outputs' consumers); 0 without a stream (fake engines on the CPU)."""
    if stream is None:
        yield 0
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    yield stream.cuda_stream
    current.wait_stream(stream)


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
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # an fp32 engine computes in fp32, as ENGINE_TOLERANCE assumes
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
    """Runs a deserialized engine on ``device`` tensors, on its own CUDA stream; ``spec`` and ``meta`` (outputs,
    version, source SHA-256, TensorRT, GPU, profile) come from the sidecar. ``EngineRunner.open`` reads a file."""

    def __init__(self, engine, spec: ModelSpec, meta: dict, device: torch.device | str, source):
        self.engine, self.spec, self.meta, self.source = engine, spec, meta, source
        self.device = torch.device(device)
        self.outputs: list[str] = meta["outputs"]
        self.precision = "fp16" if meta.get("fp16") else "fp32"
        self.profile = Profile(*(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(INPUT, 0)))
        self.dtypes = {name: _torch_dtype(engine.get_tensor_dtype(name), name, source)
                       for name in (INPUT, *self.outputs)}  # fmt: skip
        with device_scope(self.device):
            self.context = engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def open(cls, engine_path: str | Path, device: torch.device | str = "cuda") -> EngineRunner:
        """Load ``engine_path``; refuses engines built for another TensorRT or GPU, and files TensorRT cannot load."""
        trt = import_tensorrt()
        engine_path, device = Path(engine_path), torch.device(device)
        sidecar_path = engine_path.with_suffix(engine_path.suffix + ".json")
        if not sidecar_path.is_file():
            raise RuntimeError(f"{engine_path}: missing sidecar {sidecar_path.name} (export with wsss-export --trt)")
        spec, meta = parse_metadata(json.loads(sidecar_path.read_text()), sidecar_path)
        for key, now in (("tensorrt", trt.__version__), ("gpu", gpu_name(device))):
            if meta.get(key) != now:
                raise RuntimeError(f"{engine_path}: built for {key} {meta.get(key)!r}, this machine has {now!r}; "
                                   "rebuild it with wsss-export --trt")  # fmt: skip
        with device_scope(device):
            engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT {trt.__version__} could not load the engine (built by "
                               "another TensorRT version or for another GPU, or a corrupt or truncated file); "
                               "rebuild it with wsss-export --trt")  # fmt: skip
        return cls(engine, spec, meta, device, engine_path)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``image`` (B, 3, H, W) -> float32 outputs on ``device``, in ``self.outputs`` order; batches beyond the
        profile run in chunks."""
        with device_scope(self.device):
            x = image.to(self.device, self.dtypes[INPUT]).contiguous()
            return [t.float() for t in run_chunks(self._execute, self.profile.split(x, self.source))]

    def _execute(self, x: torch.Tensor) -> list[torch.Tensor]:
        shape = tuple(x.shape)
        if not self.context.set_input_shape(INPUT, shape):
            raise ProfileError(f"{self.source}: TensorRT refused input shape {dims(shape)} (profile {self.profile})")
        self.context.set_tensor_address(INPUT, x.data_ptr())
        outs = [torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=x.device)
                for name in self.outputs]  # fmt: skip
        for name, out in zip(self.outputs, outs, strict=True):
            self.context.set_tensor_address(name, out.data_ptr())
        with side_stream(self.stream) as handle:
            ok = self.context.execute_async_v3(handle)
        if not ok:
            raise RuntimeError(f"{self.source}: TensorRT execution failed at input {dims(shape)} (see its log above)")
        return outs


def _torch_dtype(dtype, name: str, source) -> torch.dtype:
    if dtype.name not in TORCH_DTYPES:
        raise RuntimeError(f"{source}: tensor {name!r} has TensorRT type {dtype.name}, which wsss does not run")
    return TORCH_DTYPES[dtype.name]


def verify_engine(runner: EngineRunner, session, shapes: list[tuple[int, ...]],
                  report: Callable[[dict], None] = lambda row: None) -> list[dict]:  # fmt: skip
    """The engine against ONNX Runtime (``session``, on the engine's ONNX file) at ``shapes`` (the profile's min,
    opt and max): max abs and scale-relative error per shape and output, each passed to ``report``. Raises in one
    line on a NaN/Inf output or an error above ``ENGINE_TOLERANCE`` for the engine's precision."""
    tolerance = ENGINE_TOLERANCE[runner.precision]
    rng = np.random.default_rng(0)
    rows = []
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        want = session.run(runner.outputs, {INPUT: x})
        got = [t.cpu().numpy() for t in runner(torch.from_numpy(x).to(runner.device))]
        for name, a, b in zip(runner.outputs, want, got, strict=True):
            err, rel = errors(a, b)
            rows.append({"shape": dims(shape), "output": name, "max_abs": err, "max_rel": rel,
                         "finite": bool(np.isfinite(b).all())})  # fmt: skip
            report(rows[-1])
    worst = max(rows, key=lambda r: r["max_rel"])
    where = f"output {worst['output']} at {worst['shape']}"
    if not worst["finite"]:
        raise RuntimeError(
            f"{runner.source}: the {runner.precision} engine gives NaN/Inf in {where}"
            + (" (fp16 overflow: build it without --fp16)" if runner.precision == "fp16" else "")
        )
    if worst["max_rel"] > tolerance:
        raise RuntimeError(f"{runner.source}: the {runner.precision} engine differs from ONNX Runtime by "
                           f"{worst['max_rel']:.2e} > {tolerance} (relative) in {where}")  # fmt: skip
    return rows
