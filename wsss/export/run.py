"""``wsss export``: checkpoint -> ONNX (-> TensorRT), verified against PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..models.official import load_any
from .onnx import export_onnx, reference_size, verify_onnx
from .tensorrt import Profile, build_engine, import_tensorrt, parse_shape, verify_engine

FP32_TOLERANCE = 1e-4  # max |ORT - torch| relative to the output's max magnitude


def run_export(
    ckpt: Path,
    method: str = "auto",
    what: str = "cam",
    onnx_path: Path | None = None,
    trt_path: str | None = None,
    fp16: bool = False,
    opset: int = 18,
    dynamic: bool = True,
    normalize: bool = False,
    shapes: tuple[str, str, str] = ("1x3x224x224", "4x3x448x448", "8x3x672x672"),
    verify: bool = False,
    simplify: bool = False,
    echo: Callable[[str], None] = print,
    vit_ckpt: Path | None = None,
) -> list[Path]:
    """Export ``what`` ("cam", "seg" or "both") of ``ckpt``; returns the files written.

    ``vit_ckpt``: the ViT file of an official CoBra pair when ``ckpt`` is its CNN file (found next to it by the
    official naming when not given).
    """
    profile = Profile(*(parse_shape(s) for s in shapes))  # refuse bad shapes before any work
    if trt_path is not None:
        import_tensorrt()
    if not dynamic and trt_path is not None and profile.min != profile.max:
        raise ValueError("--static exports one input size; give equal --min-shape/--max-shape or use --dynamic")
    model, meta, report = load_any(ckpt, method, vit_path=vit_ckpt)
    if report is not None:
        echo(str(report))
    targets = ["cam", "seg"] if what == "both" else [what]
    if "seg" in targets and not hasattr(model, "segment"):
        raise ValueError(f"{meta['method']} networks have no segmentation head; export --what cam")
    written = []
    for target in targets:
        out = onnx_path if onnx_path and len(targets) == 1 else _default_path(ckpt, onnx_path, target)
        result = export_onnx(model, meta, out, what=target, opset=opset, normalize=normalize, dynamic=dynamic)
        if simplify:
            _simplify(out)
        echo(f"wrote {out} (opset {result.opset}; input 'image' -> {', '.join(repr(n) for n in result.outputs)})")
        written.append(out)
        if verify:
            _report_parity(model, out, meta, target, normalize, dynamic, echo)
        if trt_path is not None:
            engine = out.with_suffix(".engine") if trt_path == "auto" or len(targets) > 1 else Path(trt_path)
            build_engine(out, engine, profile, fp16=fp16, timing_cache=out.parent / "timing.cache")
            echo(f"wrote {engine} (+ {engine.name}.json)")
            written.append(engine)
            if verify:
                for row in verify_engine(engine, out, [profile.min, profile.opt]):
                    echo(f"  TensorRT vs ORT {row['shape']:>14s} {row['output']:9s} max abs {row['max_abs']:.2e}"
                         f"  rel {row['max_rel']:.2e}")  # fmt: skip
    return written


def _default_path(ckpt: Path, onnx_path: Path | None, target: str) -> Path:
    base = onnx_path.with_suffix("") if onnx_path else ckpt.with_suffix("")
    return base.with_name(f"{base.name}.{target}.onnx")


def _report_parity(model, path: Path, meta: dict, target: str, normalize: bool, dynamic: bool, echo) -> None:
    size = reference_size(model, meta)
    p = model.patch_size
    sizes = [(size, size), (size // 2 // p * p, size // p * p), (size * 3 // 2 // p * p, size * 5 // 4 // p * p)]
    rows = verify_onnx(model, path, sizes if dynamic else sizes[:1], batch=2 if dynamic else 2, what=target,
                       normalize=normalize)  # fmt: skip
    worst = max(r["max_rel"] for r in rows)
    for r in rows:
        echo(f"  ORT vs torch {r['size']:>14s} {r['input']:10s} {r['output']:9s} max abs {r['max_abs']:.2e}  "
             f"rel {r['max_rel']:.2e}")  # fmt: skip
    if worst > FP32_TOLERANCE:
        raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {worst:.2e} (> {FP32_TOLERANCE})")
    echo(f"  parity OK: worst relative error {worst:.2e} <= {FP32_TOLERANCE}")


def _simplify(path: Path) -> None:
    try:
        import onnxslim
    except ImportError as err:
        raise RuntimeError("--simplify needs onnxslim: pip install onnxslim") from err
    import onnx

    slim = onnxslim.slim(onnx.load(str(path)))
    onnx.checker.check_model(slim)
    onnx.save(slim, str(path))
