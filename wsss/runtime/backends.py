"""Inference backends behind one interface: ``backend(x) -> (logits (B, K), *CAM groups)`` as float32 torch tensors,
or for segmentation (``backend.what == "seg"``: ``TorchBackend(..., what="seg")``, a ``--what seg`` graph)
``backend(x) -> (seg,)``, the decoder's logits (B, K + 1, h, w).

The groups are those of the network in cam mode: ``cams`` (B, K, h, w) for CAM and SeCo networks, ``cams_cnn`` and
``cams_vit`` for CoBra (§4.8). ``x`` is a (B, 3, H, W) float32 batch normalised by ``backend.spec``'s mean/std, on
``backend.device``, of any H, W >= ``backend.patch_size``; outputs stay on ``backend.device``. Any backend can be
handed to ``wsss.cam.pipeline.predict_cams``.

Devices: ``select_device`` turns ``--device cuda:N`` into GPU N for everything that launches work (torch, the Triton
kernels, TensorRT, ONNX Runtime's ``device_id``); every inference command opens its backend through it.
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..export.onnx import INPUT, NORM_OUTPUT, graph_for, onnx_session, ort_providers, read_metadata
from ..export.tensorrt import label_profile, ort_tensorrt_options, run_chunks
from ..models import ModelSpec, load_model
from ..models.checkpoint import file_sha256

BACKENDS = ("torch", "onnx", "onnx-trt", "trt")  # onnx-trt: ONNX Runtime's TensorRT provider
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SEG_OUTPUTS = ["seg"]  # a segmentation graph (wsss export --what seg)
ORT_TRT_FIX = "its profile follows the file's CAM settings; for other --scales or --input-size use --backend onnx"


def select_device(device: str | torch.device) -> torch.device:
    """``device`` with its index (``cuda``: the current GPU), made the current CUDA device, so that Triton kernels,
    TensorRT and ONNX Runtime run on the GPU asked for; refused in one line where there is no such GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} "
                         f"(CUDA_VISIBLE_DEVICES={visible!r}); use --device cpu")  # fmt: skip
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise ValueError(f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class TorchBackend:
    """PyTorch eager (or ``torch.compile``d) network; ``spec`` defaults to the one ``build_model`` attached.
    ``precision`` fp16 / bf16: autocast around the network only (CUDA; bf16 also on the CPU), outputs in float32."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", compile: bool = False,
                 spec: ModelSpec | None = None, what: str = "cam"):  # fmt: skip
        self.device = torch.device(device)
        self.spec: ModelSpec = spec or model.spec
        self.what = what  # cam: (logits, *CAM groups); seg: (seg logits,) of the network's decoder
        if what == "cam" and self.spec.family == "segnet":
            raise ValueError("a segmentation network has no CAMs: use --source seg")
        model = graph_for(model, self.spec, "seg") if what == "seg" else model
        self.model = model.to(self.device).eval()
        self.patch_size = self.spec.patch_size
        self.run = torch.compile(self.model, dynamic=True) if compile else self.model
        self.precision = "fp32"

    def at_precision(self, precision: str) -> TorchBackend:
        """This backend (sharing its network) with the network's forward at ``precision``."""
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 runs on CUDA devices only (CPU autocast is bf16); use fp32 or bf16")
        other = copy.copy(self)
        other.precision = precision
        return other

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mixed = self.precision != "fp32"
        with torch.autocast(self.device.type, PRECISIONS[self.precision]) if mixed else nullcontext():
            out = self.run(x)
        return tuple(t.float() for t in out)

    def layer_cams(self, x: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's CAM fused with LayerCAM maps (``cam.layers``), in float32: it needs gradients, which
        compiled and reduced-precision forwards are not used for."""
        if not hasattr(self.model, "layer_cams"):
            raise ValueError(f"cam.layers={list(layers)} (LayerCAM) is for plain CAM networks on a VGG trunk")
        return tuple(t.float() for t in self.model.layer_cams(x, layers))


class OnnxBackend:
    """An ONNX Runtime session: the CPU, or on ``cuda:N`` the CUDA provider (TF32 off) or, with ``tensorrt``, the
    TensorRT provider (engine cache, ``label_profile`` of the file's spec, fp16 with ``precision="fp16"``). Inputs
    and outputs stay on the device (IO binding), and a provider that fails to load is an error, not a CPU run."""

    name = "onnx"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", tensorrt: bool = False,
                 precision: str = "fp32", cache_dir: str | Path | None = None):  # fmt: skip
        self.path, self.device, self.precision, self.cache_dir = Path(path), torch.device(device), precision, cache_dir
        self.spec, self.meta = read_metadata(path)
        self.patch_size = self.spec.patch_size
        self.profile = label_profile(self.spec) if tensorrt else None
        if precision not in ("fp32", "fp16") or (precision == "fp16" and not tensorrt):
            raise ValueError(f"--precision {precision}: ONNX Runtime runs the file's float32 graph; fp16 needs "
                             "--backend onnx-trt (or the torch backend, or wsss export --trt --fp16)")  # fmt: skip
        if tensorrt and self.device.type != "cuda":
            raise ValueError("--backend onnx-trt runs on CUDA devices only (--device cuda)")
        options = None
        if tensorrt:
            options = ort_tensorrt_options(path, self.profile, precision == "fp16", cache_dir)
            Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
            self.name = "onnx-trt"
        self.session = onnx_session(path, ort_providers(self.device, options))
        self.outputs = _cam_outputs([o.name for o in self.session.get_outputs()], path)
        self.what = "seg" if self.outputs == SEG_OUTPUTS else "cam"

    def at_precision(self, precision: str) -> OnnxBackend:
        if precision == self.precision:
            return self
        return OnnxBackend(self.path, self.device, self.profile is not None, precision, self.cache_dir)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.to(self.device, torch.float32).contiguous()
        chunks = self.profile.split(x, self.path, ORT_TRT_FIX) if self.profile else (x,)
        return tuple(run_chunks(self._run, chunks))

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One ONNX Runtime call on device memory: ``x`` bound in place, outputs allocated on the device."""
        kind, index = self.device.type, self.device.index or 0
        if kind == "cuda":  # ONNX Runtime reads x on its own stream: torch's work on it must be done
            torch.cuda.current_stream(self.device).synchronize()
        binding = self.session.io_binding()
        binding.bind_input(INPUT, kind, index, np.float32, tuple(x.shape), x.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, kind, index)
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(v) for v in binding.get_outputs()]


class TensorRTBackend:
    """A TensorRT engine built by ``wsss export --trt`` (CUDA only); its precision is the engine's."""

    name = "trt"

    def __init__(self, path: str | Path, device: str | torch.device = "cuda"):
        from ..export.tensorrt import EngineRunner

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError("the TensorRT backend runs on CUDA devices only (--device cuda)")
        self.runner = EngineRunner.open(path, self.device)
        self.spec, self.meta = self.runner.spec, self.runner.meta
        self.patch_size = self.spec.patch_size
        keep = _cam_outputs(self.runner.outputs, path)
        self.index = [self.runner.outputs.index(n) for n in keep]
        self.what = "seg" if keep == SEG_OUTPUTS else "cam"

    def at_precision(self, precision: str) -> TensorRTBackend:
        if precision != "fp32":
            raise ValueError(f"--precision {precision}: a TensorRT engine runs at the precision it was built with "
                             "(wsss export --trt --fp16 for a half-precision engine)")  # fmt: skip
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.runner(x)
        return tuple(outs[i] for i in self.index)


def _cam_outputs(names: list[str], path: str | Path) -> list[str]:
    """The network's outputs of a CAM graph, in graph order (``cams_norm`` is for consumers without wsss), or those
    of a segmentation graph (``--what seg``)."""
    if names == SEG_OUTPUTS:
        return names
    if not names or names[0] != "logits":
        raise ValueError(f"{path}: not a CAM graph (outputs {names}); export it with --what cam")
    return [n for n in names if n != NORM_OUTPUT]


Backend = TorchBackend | OnnxBackend | TensorRTBackend


def open_backend(ckpt: str | Path | None = None, engine: str | Path | None = None, backend: str | None = None,
                 device: str = "cpu", compile: bool = False, vit_ckpt: str | Path | None = None,
                 what: str = "cam") -> tuple[Backend, ModelSpec, dict]:  # fmt: skip
    """A backend on ``select_device(device)``, its spec and metadata, from a checkpoint (torch; any file
    ``load_model`` reads, ``vit_ckpt`` the other file of an official CoBra pair) or an exported artifact (.onnx /
    .engine). ``backend.at_precision(p)`` gives it at another precision.

    ``what="seg"``: a checkpoint's network runs its decoder (``(seg,)`` logits); an artifact's graph is what it was
    exported as (``backend.what``). ``meta`` holds ``source_sha256`` (and ``source_sha256_vit`` for CoBra pairs);
    for artifacts also ``artifact_sha256`` and the file's other metadata (outputs, version).
    """
    if (ckpt is None) == (engine is None):
        raise ValueError("give exactly one of --ckpt (PyTorch) or --engine (.onnx / .engine)")
    device = select_device(device)
    if ckpt is not None:
        if backend not in (None, "torch"):
            raise ValueError(f"--backend {backend} runs exported files: export with wsss export, then pass --engine")
        loaded = load_model(ckpt, vit_path=vit_ckpt)
        return TorchBackend(loaded.model, device, compile, loaded.spec, what), loaded.spec, loaded.meta
    engine = Path(engine)
    kind = backend or ("trt" if engine.suffix in (".engine", ".plan") else "onnx")
    if kind not in BACKENDS[1:]:
        raise ValueError(f"--backend {kind} does not run exported files; use one of {', '.join(BACKENDS[1:])}")
    runner = TensorRTBackend(engine, device) if kind == "trt" else OnnxBackend(engine, device, kind == "onnx-trt")
    return runner, runner.spec, {**runner.meta, "artifact_sha256": file_sha256(engine)}
