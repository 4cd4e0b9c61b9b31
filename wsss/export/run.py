"""``wsss export``: checkpoint -> ONNX (-> TensorRT), verified against PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..models import load_model
from .onnx import (
    FP32_TOLERANCE,
    cuda_provider_usable,
    export_onnx,
    onnx_session,
    ort_providers,
    parity_sizes,
    reference_size,
    verify_onnx,
)
from .tensorrt import EngineRunner, build_engine, dims, export_profile, import_tensorrt, parse_shape, verify_engine

__all__ = ["FP32_TOLERANCE", "run_export"]


def run_export(ckpt: Path, *, what: str = "cam", onnx_path: Path | None = None, trt_path: str | None = None,
               fp16: bool = False, opset: int = 18, dynamic: bool = True, normalize: bool = False,
               shapes: tuple[str | None, str | None, str | None] = (None, None, None), verify: bool = False,
               simplify: bool = False, echo: Callable[[str], None] = print,
               vit_ckpt: Path | None = None) -> list[Path]:  # fmt: skip
    """Export ``what`` ("cam", "seg" or "both") of any checkpoint ``load_model`` reads; returns the files written.

    ``vit_ckpt``: the other file of an official CoBra pair (found next to ``ckpt`` by the official naming when not
    given). ``shapes``: the TensorRT profile's min, opt and max (None: ``label_profile`` of the spec). ``verify``:
    ONNX Runtime (its CUDA provider, TF32 off, where it runs) against PyTorch at three sizes, two off the patch
    grid, raising above ``FP32_TOLERANCE``; the engine against ONNX Runtime at the profile's min, opt and max
    shapes, raising on NaN/Inf or above ``ENGINE_TOLERANCE``.
    """
    given = tuple(s and parse_shape(s) for s in shapes)  # refuse bad shapes before any work
    if trt_path is not None:
        import_tensorrt()
    loaded = load_model(ckpt, vit_path=vit_ckpt)
    echo(str(loaded.report))
    model, spec = loaded.model, loaded.spec
    if "cam" in (what, "both") and spec.cam.layers:
        echo(f"note: cam.layers={list(spec.cam.layers)} (LayerCAM) needs gradients, which the exported graph lacks: "
             "label the file with --layers none (the CAM alone), or the checkpoint with the torch backend")  # fmt: skip
    profile = export_profile(spec, given, dynamic)
    if not dynamic and trt_path is not None and not profile.min == profile.opt == profile.max:
        raise ValueError(f"--static exports one input shape, {dims(profile.opt)}: give no other --min-shape/"
                         "--opt-shape/--max-shape, or use --dynamic")  # fmt: skip
    targets = ["cam", "seg"] if what == "both" else [what]
    if "seg" in targets and not hasattr(model, "segment"):
        raise ValueError(f"{spec.family} networks have no segmentation head; export --what cam")
    device = "cuda" if verify and cuda_provider_usable() else "cpu"
    written = []
    for target in targets:
        out = onnx_path if onnx_path and len(targets) == 1 else _default_path(ckpt, onnx_path, target)
        result = export_onnx(model, spec, out, what=target, opset=opset, normalize=normalize, dynamic=dynamic,
                             meta=loaded.meta)  # fmt: skip
        if simplify:
            _simplify(out)
        echo(f"wrote {out} (opset {result.opset}; input 'image' -> {', '.join(repr(n) for n in result.outputs)})")
        written.append(out)
        if verify:
            sizes = parity_sizes(spec) if dynamic else [(reference_size(spec),) * 2]
            _report_parity(model, out, sizes, device, echo)
        if trt_path is not None:
            engine = out.with_suffix(".engine") if trt_path == "auto" or len(targets) > 1 else Path(trt_path)
            build_engine(out, engine, profile, fp16=fp16, timing_cache=out.parent / "timing.cache")
            echo(f"wrote {engine} (+ {engine.name}.json; profile {profile})")
            written.append(engine)
            if verify:
                runner, session = EngineRunner.open(engine), onnx_session(out, ort_providers(device))
                verify_engine(runner, session, [profile.min, profile.opt, profile.max], report=lambda r: echo(
                    f"  TensorRT vs ORT {r['shape']:>14s} {r['output']:9s} max abs {r['max_abs']:.2e}"
                    f"  rel {r['max_rel']:.2e}"))  # fmt: skip
                echo(f"  engine OK ({runner.precision})")
    return written


def _default_path(ckpt: Path, onnx_path: Path | None, target: str) -> Path:
    base = onnx_path.with_suffix("") if onnx_path else ckpt.with_suffix("")
    return base.with_name(f"{base.name}.{target}.onnx")


def _report_parity(model: nn.Module, path: Path, sizes: list[tuple[int, int]], device: str, echo) -> None:
    rows = verify_onnx(model, path, sizes, batch=2, device=device)
    for r in rows:
        echo(f"  ORT vs torch {r['size']:>14s} {r['input']:10s} {r['output']:9s} max abs {r['max_abs']:.2e}  "
             f"rel {r['max_rel']:.2e}")  # fmt: skip
    worst = max(r["max_rel"] for r in rows)
    if not worst <= FP32_TOLERANCE:
        raise RuntimeError(f"{path}: ONNX Runtime ({device}) differs from PyTorch by {worst:.2e} (> {FP32_TOLERANCE}"
                           "; inf: NaN/Inf in its outputs)")  # fmt: skip
    echo(f"  parity OK ({device} provider): worst relative error {worst:.2e} <= {FP32_TOLERANCE}")


def _simplify(path: Path) -> None:
    try:
        import onnxslim
    except ImportError as err:
        raise RuntimeError("--simplify needs onnxslim: pip install onnxslim") from err
    import onnx

    slim = onnxslim.slim(onnx.load(str(path)))
    onnx.checker.check_model(slim)
    onnx.save(slim, str(path))
