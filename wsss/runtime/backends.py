"""Inference backends behind one interface: ``backend(x) -> (logits (B, K), *CAM groups)`` as torch tensors.

The groups are those of the network in cam mode: ``cams`` (B, K, h, w) for CAM and SeCo networks, ``cams_cnn`` and
``cams_vit`` for CoBra (§4.8). ``x`` is a (B, 3, H, W) float32 batch normalised by ``backend.spec``'s mean/std, on
``backend.device``, of any H, W >= ``backend.patch_size``. Any backend can be handed to
``wsss.cam.pipeline.predict_cams``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..export.onnx import INPUT, NORM_OUTPUT, onnx_session, read_metadata
from ..models import ModelSpec, load_model
from ..models.checkpoint import file_sha256

BACKENDS = ("torch", "onnx", "trt")


class TorchBackend:
    """PyTorch eager (or ``torch.compile``d) network; ``spec`` defaults to the one ``build_model`` attached."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu", compile: bool = False,
                 spec: ModelSpec | None = None):  # fmt: skip
        self.device = torch.device(device)
        self.spec: ModelSpec = spec or model.spec
        self.model = model.to(self.device).eval()
        self.patch_size = self.spec.patch_size
        self.run = torch.compile(self.model, dynamic=True) if compile else self.model

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.run(x))


class OnnxBackend:
    """ONNX Runtime session on CPU, or CUDA / TensorRT execution providers when present and ``device`` is cuda."""

    name = "onnx"

    def __init__(self, path: str | Path, device: str = "cpu"):
        import onnxruntime as ort

        self.device = torch.device(device)
        self.spec, self.meta = read_metadata(path)
        self.patch_size = self.spec.patch_size
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] + wanted
        self.session = onnx_session(path, wanted)
        self.outputs = _cam_outputs([o.name for o in self.session.get_outputs()], path)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session.run(self.outputs, {INPUT: x.detach().cpu().numpy().astype(np.float32)})
        return tuple(torch.from_numpy(o).to(self.device) for o in outs)


class TensorRTBackend:
    """A TensorRT engine built by ``wsss export --trt`` (CUDA only)."""

    name = "trt"

    def __init__(self, path: str | Path, device: str = "cuda"):
        from ..export.tensorrt import EngineRunner

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError("the TensorRT backend runs on CUDA devices only (--device cuda)")
        self.runner = EngineRunner(path)
        self.spec, self.meta = self.runner.spec, self.runner.meta
        self.patch_size = self.spec.patch_size
        keep = _cam_outputs(self.runner.outputs, path)
        self.index = [self.runner.outputs.index(n) for n in keep]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.runner(x.to(self.device))
        return tuple(outs[i] for i in self.index)


def _cam_outputs(names: list[str], path: str | Path) -> list[str]:
    """The network's outputs of a CAM graph, in graph order (``cams_norm`` is for consumers without wsss)."""
    if not names or names[0] != "logits":
        raise ValueError(f"{path}: not a CAM graph (outputs {names}); export it with --what cam")
    return [n for n in names if n != NORM_OUTPUT]


Backend = TorchBackend | OnnxBackend | TensorRTBackend


def open_backend(ckpt: str | Path | None = None, engine: str | Path | None = None, backend: str | None = None,
                 device: str = "cpu", compile: bool = False,
                 vit_ckpt: str | Path | None = None) -> tuple[Backend, ModelSpec, dict]:  # fmt: skip
    """A backend, its spec and metadata, from a checkpoint (torch; any file ``load_model`` reads, ``vit_ckpt`` the
    other file of an official CoBra pair) or an exported artifact (.onnx / .engine).

    ``meta`` holds ``source_sha256`` (and ``source_sha256_vit`` for CoBra pairs); for artifacts also
    ``artifact_sha256`` and the file's other metadata (outputs, version).
    """
    if (ckpt is None) == (engine is None):
        raise ValueError("give exactly one of --ckpt (PyTorch) or --engine (.onnx / .engine)")
    if ckpt is not None:
        if backend not in (None, "torch"):
            raise ValueError(f"--backend {backend} runs exported files: export with wsss export, then pass --engine")
        loaded = load_model(ckpt, vit_path=vit_ckpt)
        return TorchBackend(loaded.model, device, compile, loaded.spec), loaded.spec, loaded.meta
    engine = Path(engine)
    kind = backend or ("trt" if engine.suffix in (".engine", ".plan") else "onnx")
    if kind not in BACKENDS[1:]:
        raise ValueError(f"--backend {kind} does not run exported files; use one of {', '.join(BACKENDS[1:])}")
    runner = TensorRTBackend(engine, device) if kind == "trt" else OnnxBackend(engine, device)
    return runner, runner.spec, {**runner.meta, "artifact_sha256": file_sha256(engine)}
