"""ONNX export of CAM networks with dynamic batch and image size, the model spec inside, and parity checks.

Graph interface (also in the file's ``doc_string``):
    input  ``image``     float32 (B, 3, H, W), RGB normalised by the spec's mean/std; any H, W >= the patch size
    output ``logits``    float32 (B, K), image-level class scores (sigmoid for probabilities)
    CAM / SeCo networks:
    output ``cams``      float32 (B, K, h, w), raw CAMs ``W . F`` on the token grid ``h = floor(H / p)``
    CoBra networks (§4.8), both foreground-only and pre-ReLU, each on its branch's grid (they differ at sizes that
    are not multiples of the patch):
    output ``cams_cnn``  float32 (B, K, hc, wc), the CNN CAM ``M_cnn`` (4.1)
    output ``cams_vit``  float32 (B, K + 1, ht, wt), ``A_obj * M_tran`` (4.5) in ``[:K]``, ``A_obj`` in ``[K]``
    with ``normalize=True``:
    output ``cams_norm`` float32 (B, C, H, W), ``wsss.cam.pipeline.single_scale_maps`` under the spec's CAM settings:
                         min-max normalised CAMs (1.5), C = K; CoBra: the combined max-normalised sources (4.17),
                         (4.19) and ``A_obj`` for the percentile background (4.20), C = K + 1
The segmentation graph (SeCo's decoder) has the same input and one output:
    output ``seg``       float32 (B, K + 1, h, w), segmentation logits with background in channel 0

The spec (``wsss.models.ModelSpec``: family, architecture, classes, mean/std, CAM settings) is stored as JSON under
the ``metadata_props`` key ``spec``, with the version, the output names and the source checkpoints' SHA-256.
Position embeddings are resampled inside the graph, which needs the torch dynamo exporter.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from .. import __version__
from ..cam.pipeline import single_scale_maps
from ..models.loading import spec_from_meta
from ..models.spec import CAMSettings, ModelSpec

INPUT = "image"
NORM_OUTPUT = "cams_norm"
FP32_TOLERANCE = 1e-4  # max |ORT - torch| relative to the output's max magnitude
SOURCE_KEYS = ("source_sha256", "source_sha256_vit")
EXAMPLE_BATCH = 2  # the example input's batch: >= 2, or torch.export specialises it to 1 (a static graph keeps it)
ORT_HINT = "pip install 'wsss[cpu]' (or 'wsss[gpu]' for onnxruntime-gpu on CUDA machines; never both)"


class CAMGraph(nn.Module):
    """The exported CAM computation: image -> (logits, *CAM groups[, cams_norm]); normalised when given settings."""

    def __init__(self, model: nn.Module, cam: CAMSettings | None = None):
        super().__init__()
        self.model, self.cam = model, cam

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, *groups = self.model(image)
        if self.cam is None:
            return (logits, *groups)
        return (logits, *groups, single_scale_maps(groups, (image.shape[-2], image.shape[-1]), self.cam))


class SegGraph(nn.Module):
    """The exported segmentation computation: image -> seg logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "segment"):
            raise ValueError(f"{type(model).__name__} has no segmentation head; export --what cam")
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.segment(image),)


def output_names(spec: ModelSpec, what: str = "cam", normalize: bool = False) -> list[str]:
    """The graph's outputs in order."""
    if what == "seg":
        return ["seg"]
    cams = ["cams_cnn", "cams_vit"] if spec.family == "cobra" else ["cams"]
    return ["logits", *cams, *([NORM_OUTPUT] if normalize else [])]


def graph_for(model: nn.Module, spec: ModelSpec, what: str = "cam", normalize: bool = False) -> nn.Module:
    """The module an export of ``what`` ("cam" or "seg") traces, and ``verify_onnx`` runs in PyTorch."""
    if what not in ("cam", "seg"):
        raise ValueError(f"what must be 'cam' or 'seg', got {what!r}")
    return SegGraph(model).eval() if what == "seg" else CAMGraph(model, spec.cam if normalize else None).eval()


@dataclass
class ExportResult:
    path: Path
    opset: int
    outputs: list[str]
    metadata: dict[str, str]


def export_onnx(model: nn.Module, spec: ModelSpec, out: str | Path, what: str = "cam", opset: int = 18,
                normalize: bool = False, dynamic: bool = True, example_size: int | None = None,
                meta: dict | None = None) -> ExportResult:  # fmt: skip
    """Export the ``what`` graph ("cam" or "seg") of ``model`` to ``out``, checked by ``onnx.checker``.

    ``meta``: the checkpoint's metadata (``LoadedModel.meta``), whose source SHA-256 go into the file.
    ``dynamic``: batch, height and width are free (any H, W >= the patch size); the graph is then run once by ONNX
    Runtime at a second, off-grid size against PyTorch, so that a graph that torch.export specialised to the
    example input is refused instead of written. Static graphs take ``example_size`` (default: ``reference_size``).
    ``model`` may sit on any device: the graph is traced from a CPU copy (``on_cpu``).
    """
    out = Path(out)
    patch, size = spec.patch_size, example_size or reference_size(spec)
    graph = graph_for(on_cpu(model).eval(), spec, what, normalize)
    # off the patch grid and not square, so that neither the crop to whole patches nor a square-image branch is
    # specialised away
    hw = (off_grid(size + patch // 2, patch), off_grid(size + 3 * patch // 2, patch)) if dynamic else (size, size)
    example = torch.randn(EXAMPLE_BATCH, 3, *hw)
    names = output_names(spec, what, normalize)
    shapes = None
    if dynamic:
        shapes = {"image": _free_dims(model, patch)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT], output_names=names,
                                    dynamic_shapes=shapes, opset_version=opset, verbose=False)  # fmt: skip
    program.optimize()
    proto = program.model_proto
    metadata = _metadata(spec, names, meta or {})
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = _describe(spec, names)
    onnx.checker.check_model(proto)
    if dynamic:
        _check_generalises(graph, proto, out, parity_sizes(spec)[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    return ExportResult(out, proto.opset_import[0].version, names, metadata)


def _free_dims(model: nn.Module, patch: int) -> dict[int, Any]:
    """Batch, height and width free, H and W from ``patch`` to 8192. Named ``Dim`` s make torch.export prove every
    shape guard over the whole range. A network whose ``size_guards_unprovable`` is true (SegFormer: guards on
    the grids of an input padded to its stride, true for every size but not provable by torch.export's range
    analysis) gets ``Dim.DYNAMIC`` hints with the same bounds instead, which record such guards without
    specialising; ``_check_generalises`` and ``--verify`` then test the graph at other sizes."""
    if getattr(model, "size_guards_unprovable", False):
        hint = torch.export.Dim.DYNAMIC
        return {0: hint(min=1, max=1024), 2: hint(min=patch, max=8192), 3: hint(min=patch, max=8192)}
    height, width = (torch.export.Dim(n, min=patch, max=8192) for n in ("height", "width"))
    return {0: torch.export.Dim("batch", min=1, max=1024), 2: height, 3: width}


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when it is on the CPU, else a CPU copy (the original stays on its device): exports trace on
    the CPU, so that the graph, its example input and the parity checks never mix devices or use TF32."""
    tensors = [*model.parameters(), *model.buffers()]
    return model if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(model).cpu()


def reference_size(spec: ModelSpec) -> int:
    """The spec's CAM input size, or for native-size inference the architecture's ``img_size`` (SEAM: its training
    crop) or the size the ViT's positions are stored at (CoBra)."""
    return int(spec.cam.input_size or spec.arch.get("img_size") or spec.arch["backbone"]["img_size"])


def parity_sizes(spec: ModelSpec) -> list[tuple[int, int]]:
    """Three check sizes around the reference size S: (S, S), a VOC-like 281 x 500 at S = 448 and a larger
    non-square one; the last two off the patch grid."""
    s, p = reference_size(spec), spec.patch_size
    return [(s, s), (off_grid(s * 281 // 448, p), off_grid(s * 500 // 448, p)),
            (off_grid(s * 3 // 2, p), off_grid(s * 5 // 4, p))]  # fmt: skip


def off_grid(n: int, patch: int) -> int:
    """``n``, moved off the patch grid (and to at least one patch)."""
    n = max(n, patch + 1)
    return n + 1 if n % patch == 0 else n


def _metadata(spec: ModelSpec, names: list[str], meta: dict) -> dict[str, str]:
    sources = {k: str(meta[k]) for k in SOURCE_KEYS if meta.get(k)}
    return {"spec": json.dumps(spec.to_dict()), "wsss_version": __version__, "input": INPUT,
            "outputs": json.dumps(names), "patch_size": str(spec.patch_size), **sources}  # fmt: skip


def _describe(spec: ModelSpec, names: list[str]) -> str:
    """The human-readable interface, as the file's ``doc_string``."""
    return (f"wsss {__version__} {spec.family} network, {spec.num_fg} classes + background, patch {spec.patch_size}"
            f": {INPUT} (B,3,H,W) RGB normalised by mean {list(spec.mean)} std {list(spec.std)}, any H, W >= "
            f"{spec.patch_size} -> {', '.join(names)}; the model spec is in metadata_props['spec']")  # fmt: skip


def read_metadata(path: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and the other metadata (``outputs`` as a list, version, source SHA-256) of an exported file."""
    proto = onnx.load(str(path), load_external_data=False)
    return parse_metadata({p.key: p.value for p in proto.metadata_props}, path)


def parse_metadata(props: dict[str, Any], path: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and the rest of ONNX ``metadata_props`` (JSON strings) or of an engine sidecar (JSON values)."""
    if "spec" not in props:
        raise ValueError(f"{path}: exported by an older wsss without a model spec in its metadata; re-export it "
                         "with wsss export")  # fmt: skip
    decoded = {k: json.loads(v) if k in ("spec", "outputs") and isinstance(v, str) else v for k, v in props.items()}
    spec = spec_from_meta(decoded, path)  # the checkpoints' reader: one place validates a stored spec
    del decoded["spec"]
    return spec, decoded


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise RuntimeError(f"ONNX Runtime is not installed: {ORT_HINT}") from err
    return ort


def ort_providers(device: torch.device | str = "cpu", tensorrt: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """ONNX Runtime execution providers with their options for ``device``: the CPU; on ``cuda:N`` the CUDA provider
    on GPU N with TF32 off (fp32 means fp32, as in ``--verify``), after the TensorRT provider when ``tensorrt``
    gives its options (``wsss.export.tensorrt.ort_tensorrt_options``)."""
    device = torch.device(device)
    cpu = ("CPUExecutionProvider", {})
    if device.type != "cuda":
        return [cpu]
    index = str(device.index or 0)
    cuda = ("CUDAExecutionProvider", {"device_id": index, "use_tf32": "0"})
    if tensorrt is None:
        return [cuda, cpu]
    return [("TensorrtExecutionProvider", {"device_id": index, **tensorrt}), cuda, cpu]


def cuda_provider_usable() -> bool:
    """A CUDA GPU and an onnxruntime with the CUDA provider (onnxruntime-gpu)."""
    return torch.cuda.is_available() and "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()


def onnx_session(path: str | Path, providers: list[tuple[str, dict]] | None = None):
    """An ``InferenceSession`` on ``providers`` (default: the CPU), refused in one line when ONNX Runtime lacks one
    of them or starts without it: a CUDA provider that fails to load must not fall back to the CPU unseen."""
    ort = import_onnxruntime()
    providers = providers or ort_providers("cpu")
    names = [name for name, _ in providers]
    absent = [n for n in names if n not in ort.get_available_providers()]
    if absent:
        raise RuntimeError(f"{path}: this onnxruntime {ort.__version__} has no {', '.join(absent)}: {ORT_HINT}, or "
                           "use --device cpu")  # fmt: skip
    session = ort.InferenceSession(str(path), providers=names, provider_options=[opts for _, opts in providers])
    check_providers(session, names, path)
    return session


def check_providers(session, wanted: list[str], path: str | Path) -> None:
    """Refuse a session that started without a provider it was asked for (ONNX Runtime only logs the fallback)."""
    got = session.get_providers()
    lost = [p for p in wanted if p not in got]
    if lost:
        raise RuntimeError(f"{path}: ONNX Runtime could not start {', '.join(lost)} and would run on "
                           f"{', '.join(got)}: a CUDA, cuDNN or TensorRT library is missing or of another version "
                           "(its log above names it); fix the install, or use --device cpu")  # fmt: skip


def _check_generalises(graph: nn.Module, proto: onnx.ModelProto, out: Path, hw: tuple[int, int]) -> None:
    """Refuse a dynamic graph that does not run like PyTorch at a size other than the example's."""
    x = np.random.default_rng(1).standard_normal((1, 3, *hw)).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for t in graph(torch.from_numpy(x))]
    ort = import_onnxruntime()
    try:
        quiet = ort.SessionOptions()
        quiet.log_severity_level = 4  # the failure is reported below, in one line
        session = ort.InferenceSession(proto.SerializeToString(), quiet, providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT: x})
        worst = max(errors(a, b)[1] for a, b in zip(want, got, strict=True))
    except Exception as err:  # ORT reports shape errors as its own exception types
        worst, why = float("inf"), str(err).splitlines()[0][-200:]
    else:
        why = f"relative error {worst:.2e}"
    if worst > FP32_TOLERANCE:
        raise RuntimeError(f"{out}: the exported graph does not generalise from the example input to 1x3x{hw[0]}x"
                           f"{hw[1]} ({why}): torch.export specialised a size-dependent branch or scale factor "
                           "of the network; export with --static for one input size")  # fmt: skip


def errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max abs and scale-relative difference; infinite for different shapes or a NaN/Inf in ``b``."""
    if a.shape != b.shape or not np.isfinite(b).all():
        return float("inf"), float("inf")
    err = float(np.abs(a - b).max())
    return err, err / (float(np.abs(a).max()) or 1.0)


@torch.no_grad()
def verify_onnx(model: nn.Module, path: str | Path, sizes: list[tuple[int, int]], batch: int = 2,
                device: torch.device | str = "cpu") -> list[dict]:  # fmt: skip
    """ONNX Runtime on ``device``'s providers (CUDA with TF32 off) against PyTorch on the CPU, on random and
    image-like inputs, for every output of the file (the graph is rebuilt from the file's spec and outputs); max abs
    and scale-relative error per size, input and output."""
    spec, props = read_metadata(path)
    names = props["outputs"]
    graph = graph_for(on_cpu(model).eval(), spec, "seg" if names == ["seg"] else "cam", NORM_OUTPUT in names)
    session = onnx_session(path, ort_providers(device))
    rows = []
    rng = np.random.default_rng(0)
    for h, w in sizes:
        for kind in ("random", "image-like"):
            x = _input(rng, kind, batch, h, w)
            want = [t.numpy() for t in graph(torch.from_numpy(x))]
            got = session.run(names, {INPUT: x})
            for name, a, b in zip(names, want, got, strict=True):
                err, rel = errors(a, b)
                rows.append({"size": f"{batch}x3x{h}x{w}", "input": kind, "output": name, "max_abs": err,
                             "max_rel": rel})  # fmt: skip
    return rows


def _input(rng: np.random.Generator, kind: str, batch: int, h: int, w: int) -> np.ndarray:
    if kind == "random":
        return rng.standard_normal((batch, 3, h, w)).astype(np.float32)
    # smooth colour fields with edges, normalised like a photo
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)])
    img = (base[None] + 0.2 * rng.standard_normal((batch, 3, h, w))) * 1.1
    return img.astype(np.float32)
