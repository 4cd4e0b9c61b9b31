"""ONNX export of CAM networks with dynamic batch and spatial size, metadata inside, and parity checks.

Graph interface (documented for users of the file):
    input  ``image``  float32 (B, 3, H, W), ImageNet-normalised RGB; H and W multiples of the patch size
    output ``logits`` float32 (B, K), image-level class scores (sigmoid for probabilities)
    output ``cams``   float32 (B, K, H/p, W/p), raw CAMs ``W . F`` at feature resolution
    output ``cams_norm`` (with ``normalize=True``) ReLU + per-class min-max normalised CAMs (METHODS 1.5)
CoBra networks (method "cobra") export the same graph with 2K + 1 CAM channels, foreground only, pre-ReLU:
    ``cams[:, :K]``   the CNN CAM ``M_cnn`` (4.1)
    ``cams[:, K:2K]`` the ViT CAM weighted by the class-token attention, ``A_obj * M_tran`` (4.5)
    ``cams[:, 2K]``   ``A_obj``, the layer-summed, head-averaged class-token attention (4.3, 4.4)
    ``logits`` is the mean of both branches' GAP logits; with ``normalize=True``, ``cams_norm`` (B, K + 1, h, w)
    holds the fused seed map ``M_fuse = max((M_cnn + M_tran) / 2, M_tran)`` of the two max-normalised sources
    (4.17, 4.19; single scale, no flip) and ``ReLU(A_obj)`` un-normalised in channel K, as the attention
    background (4.18, 4.20) expects: one engine call gives CoBra's seed map.
The segmentation graph (SeCo's decoder) has the same input and one output:
    output ``seg``    float32 (B, C, H/p, W/p), segmentation logits with background in channel 0

Position embeddings are interpolated inside the graph (timm ``dynamic_img_size``), which needs the torch dynamo
exporter: the TorchScript exporter bakes the training size in (see NOTES.md).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..cam.cobra import fuse, max_normalize, split_sources
from ..cam.multiscale import normalize_cam

INPUT = "image"


class CAMGraph(nn.Module):
    """The exported CAM computation: image -> (logits, cams[, cams_norm])."""

    def __init__(self, model: nn.Module, normalize: bool = False):
        super().__init__()
        self.model, self.normalize = model, normalize
        self.cobra = getattr(model, "method", None) == "cobra"

    def forward(self, image: torch.Tensor):
        logits, cams = self.model(image)
        if not self.normalize:
            return logits, cams
        if self.cobra:  # M_fuse of the max-normalised sources; A_obj kept at its own scale
            m_cnn, m_tran, a_obj = split_sources(cams.relu(), logits.shape[1])
            return logits, cams, torch.cat([fuse(max_normalize(m_cnn), max_normalize(m_tran)), a_obj[:, None]], 1)
        return logits, cams, normalize_cam(cams.relu())


class SegGraph(nn.Module):
    """The exported segmentation computation: image -> seg logits."""

    def __init__(self, model: nn.Module, normalize: bool = False):
        super().__init__()
        if not hasattr(model, "segment"):
            raise ValueError(f"{type(model).__name__} has no segmentation head; export --what cam")
        self.model = model

    def forward(self, image: torch.Tensor):
        return (self.model.segment(image),)


GRAPHS = {"cam": CAMGraph, "seg": SegGraph}


def output_names(what: str, normalize: bool = False) -> list[str]:
    if what == "seg":
        return ["seg"]
    return ["logits", "cams", "cams_norm"] if normalize else ["logits", "cams"]


@dataclass
class ExportResult:
    path: Path
    opset: int
    outputs: list[str]
    metadata: dict[str, str]


def export_onnx(
    model: nn.Module,
    meta: dict,
    out: str | Path,
    what: str = "cam",
    opset: int = 18,
    normalize: bool = False,
    dynamic: bool = True,
    example_size: int | None = None,
    source_sha256: str = "",
) -> ExportResult:
    """Export the ``what`` graph ("cam" or "seg") of ``model`` to ``out`` and check it with ``onnx.checker``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    patch = model.patch_size
    size = example_size or reference_size(model, meta)
    size = max(patch, size // patch * patch)
    graph = GRAPHS[what](model.eval(), normalize).eval()
    example = torch.randn(2, 3, size, size)  # batch >= 2, or torch.export specialises it to 1
    names = output_names(what, normalize)
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        rows, cols = torch.export.Dim("rows", min=1, max=512), torch.export.Dim("cols", min=1, max=512)
        shapes = {"image": {0: batch, 2: patch * rows, 3: patch * cols}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT], output_names=names,
                                    dynamic_shapes=shapes, opset_version=opset, verbose=False)  # fmt: skip
    program.optimize()
    proto = program.model_proto
    metadata = _metadata(meta, patch, names, source_sha256 or meta.get("source_sha256", ""))
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    return ExportResult(out, proto.opset_import[0].version, names, metadata)


def reference_size(model: nn.Module, meta: dict) -> int:
    """The checkpoint's CAM input size, or for native-size inference (CoBra) the ViT's stored training size."""
    size = meta["config"]["cam"].get("input_size")
    if size:
        return int(size)
    vit = getattr(model, "backbone", None)
    return int(vit.patch_embed.img_size[0]) if vit is not None else 14 * model.patch_size


def _metadata(meta: dict, patch: int, names: list[str], source_sha256: str) -> dict[str, str]:
    extra = {"source_sha256_vit": meta["source_sha256_vit"]} if meta.get("source_sha256_vit") else {}
    return {
        "wsss_version": __version__,
        "method": meta["method"],
        "class_names": json.dumps(meta["class_names"]),
        "mean": json.dumps(meta["mean"]),
        "std": json.dumps(meta["std"]),
        "patch_size": str(patch),
        "input": INPUT,
        "outputs": json.dumps(names),
        "cam_settings": json.dumps(meta["config"]["cam"]),
        "source_sha256": source_sha256,
        **extra,
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def onnx_session(path: str | Path, providers: list[str] | None = None):
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), providers=wanted)


@torch.no_grad()
def verify_onnx(
    model: nn.Module,
    path: str | Path,
    sizes: list[tuple[int, int]],
    batch: int = 2,
    what: str = "cam",
    normalize: bool = False,
) -> list[dict]:
    """Run ONNX Runtime and PyTorch on random and image-like inputs; max abs and scale-relative error per output."""
    session = onnx_session(path)
    graph = GRAPHS[what](model.eval(), normalize)
    rows = []
    rng = np.random.default_rng(0)
    for h, w in sizes:
        for kind in ("random", "image-like"):
            x = _input(rng, kind, batch, h, w)
            want = [t.numpy() for t in graph(torch.from_numpy(x))]
            got = session.run(None, {INPUT: x})
            for name, a, b in zip(output_names(what, normalize), want, got, strict=True):
                err = float(np.abs(a - b).max())
                scale = float(np.abs(a).max()) or 1.0
                rows.append({"size": f"{batch}x3x{h}x{w}", "input": kind, "output": name, "max_abs": err,
                             "max_rel": err / scale})  # fmt: skip
    return rows


def _input(rng: np.random.Generator, kind: str, batch: int, h: int, w: int) -> np.ndarray:
    if kind == "random":
        return rng.standard_normal((batch, 3, h, w)).astype(np.float32)
    # smooth colour fields with edges, normalised like a photo
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)])
    img = (base[None] + 0.2 * rng.standard_normal((batch, 3, h, w))) * 1.1
    return img.astype(np.float32)
