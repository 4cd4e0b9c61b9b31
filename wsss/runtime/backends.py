"""Inference backends behind one interface: ``backend(x) -> (logits (B, K), cams (B, K, h, w))`` as torch tensors.

``x`` is an ImageNet-normalised (B, 3, H, W) float32 batch on ``backend.device``; H and W are multiples of
``backend.patch_size``. Any backend can be handed to ``wsss.cam.infer.predict_cams``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..export.onnx import INPUT, onnx_session, read_metadata
from ..models.checkpoint import file_sha256
from ..models.official import load_any

BACKENDS = ("torch", "onnx", "trt")


class TorchBackend:
    """PyTorch eager (or ``torch.compile``d) network."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu", compile: bool = False):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.patch_size = model.patch_size
        self.run = torch.compile(self.model, dynamic=True) if compile else self.model

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(x)


class OnnxBackend:
    """ONNX Runtime session on CPU, or CUDA / TensorRT execution providers when present and ``device`` is cuda."""

    name = "onnx"

    def __init__(self, path: str | Path, device: str = "cpu"):
        import onnxruntime as ort

        self.device = torch.device(device)
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] + wanted
        self.session = onnx_session(path, wanted)
        self.props = read_metadata(path)
        self.patch_size = int(self.props["patch_size"])
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs[:2] != ["logits", "cams"]:
            raise ValueError(f"{path}: not a CAM graph (outputs {outputs}); export it with --what cam")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cams = self.session.run(["logits", "cams"], {INPUT: x.detach().cpu().numpy().astype(np.float32)})
        return torch.from_numpy(logits).to(self.device), torch.from_numpy(cams).to(self.device)


class TensorRTBackend:
    """A TensorRT engine built by ``wsss export --trt`` (CUDA only)."""

    name = "trt"

    def __init__(self, path: str | Path, device: str = "cuda"):
        from ..export.tensorrt import EngineRunner

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError("the TensorRT backend runs on CUDA devices only (--device cuda)")
        self.runner = EngineRunner(path)
        self.props = self.runner.meta
        self.patch_size = int(self.props["patch_size"])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cams = self.runner(x.to(self.device))[:2]
        return logits, cams


def meta_from_props(props: dict[str, str]) -> dict:
    """Checkpoint-style metadata from an artifact's ONNX metadata / engine sidecar."""
    return {
        "method": props["method"], "class_names": json.loads(props["class_names"]), "mean": json.loads(props["mean"]),
        "std": json.loads(props["std"]), "config": {"cam": json.loads(props["cam_settings"])},
        "source_sha256": props.get("source_sha256", ""),
    }  # fmt: skip


def open_backend(
    ckpt: str | Path | None = None, engine: str | Path | None = None, backend: str | None = None,
    device: str = "cpu", compile: bool = False,
) -> tuple[TorchBackend | OnnxBackend | TensorRTBackend, dict]:  # fmt: skip
    """A backend and its metadata from a checkpoint (torch) or an exported artifact (.onnx / .engine)."""
    if (ckpt is None) == (engine is None):
        raise ValueError("give exactly one of --ckpt (PyTorch) or --engine (.onnx / .engine)")
    if ckpt is not None:
        if backend not in (None, "torch"):
            raise ValueError(f"--backend {backend} runs exported files: export with wsss export, then pass --engine")
        model, meta, _ = load_any(ckpt)
        return TorchBackend(model, device, compile), meta
    engine = Path(engine)
    kind = backend or ("trt" if engine.suffix in (".engine", ".plan") else "onnx")
    runner = TensorRTBackend(engine, device) if kind == "trt" else OnnxBackend(engine, device)
    meta = meta_from_props(runner.props)
    meta["artifact_sha256"] = file_sha256(engine)
    return runner, meta
