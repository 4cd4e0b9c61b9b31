"""Fused kernels (wsss.kernels) against their vectorised PyTorch references and the official loop-style code.

Per kernel and shape: median time (forward + backward for the losses) and peak extra memory
(``torch.cuda.max_memory_allocated`` above the inputs, CUDA only; on CPU it is reported as n/a, not estimated)
of the Triton kernel, the vectorised reference and, for CoBra's losses, the official per-patch loop
(``wsss/train/official_loops.py``). The losses are the library's own (``wsss.train.cobra_losses`` in the official code's
mode, the kernel backend chosen through ``WSSS_KERNELS``), so all three compute the same number; the largest
difference to the reference is reported as a check.

Before each case the script prints its estimated device footprint (inputs plus the largest variant's
intermediates, ``footprint``) and skips a case above ``--max-gib`` (default 16, so the paper shapes fit a 24 GB
card); on CUDA the measured peak of the whole case is recorded beside the estimate. ``--scale`` multiplies
every batch size. On CPU the Triton column runs only under the Triton interpreter (a correctness smoke run, not
a speed).

    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --quick   # tinier shapes, Triton interpreted, < 1 min
    python benchmarks/bench_kernels.py --quick --threads 1          # small shapes, CPU references only, ~15 s; one
                                                                    # thread keeps timings stable on a shared CPU
    python benchmarks/bench_kernels.py --device cuda                # paper shapes: N = 196/784, D up to 768
    python benchmarks/bench_kernels.py --device cuda --scale 0.5    # half the batch sizes (a smaller GPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import add_json_option, write_result
from wsss.kernels import cam_postprocess, masked_ptc
from wsss.kernels.dispatch import ENV_VAR, interpreter_enabled, triton_available
from wsss.train.cobra_losses import cap_loss, sap_loss
from wsss.train.official_loops import official_cap_loop, official_sap_loop

NA_TRITON = "n/a (needs CUDA or TRITON_INTERPRET=1)"
BACKENDS = {"triton": "triton", "reference": "torch"}  # column -> wsss.kernels backend
FP32, INT64 = 4, 8
GIB = 2**30


@dataclass(frozen=True)
class Case:
    kernel: str  # "sap", "cap", "masked_ptc" or "cam_post"
    shape: dict


def paper_cases(scale: float = 1.0) -> list[Case]:
    """CoBra: B = 8, 14x14 (224 crop) and 28x28 grids, k 20/5 (SAP) and 5/20 (CAP); SeCo PTC at 28x28 (448 crop),
    D = 768; seeds: 7 scales x 2 flips, 20 classes, ~400 px (CoBra, B = 1 and 4), 4 scales at 448 px (SeCo, B = 4).
    Batch sizes times ``scale`` (at least 1)."""
    cases = [Case("sap", dict(b=8, h=s, w=s, d=d, c=20, k_pos=20, k_neg=5)) for s in (14, 28) for d in (256, 768)]
    cases += [Case("cap", dict(b=8, h=s, w=s, d=d, k_pos=5, k_neg=20)) for s in (14, 28) for d in (128, 256)]
    cases += [Case("masked_ptc", dict(b=b, h=s, w=s, d=768)) for b, s in ((8, 14), (4, 28), (8, 28))]
    cases += [
        Case("cam_post", dict(s=4, f=2, b=4, k=20, h=448, w=448, flip_merge="max", norm="minmax", fuse=False)),
        Case("cam_post", dict(s=7, f=2, b=1, k=20, h=400, w=400, flip_merge="sum", norm="max", fuse=True)),
        Case("cam_post", dict(s=7, f=2, b=4, k=20, h=400, w=400, flip_merge="sum", norm="max", fuse=True)),
    ]
    return [Case(c.kernel, {**c.shape, "b": max(1, round(c.shape["b"] * scale))}) for c in cases]


def quick_cases(interpreted: bool = False) -> list[Case]:
    """Small shapes for a CPU smoke run; tinier ones when the Triton interpreter runs (one program at a time)."""
    if interpreted:
        return [
            Case("sap", dict(b=1, h=4, w=4, d=32, c=5, k_pos=4, k_neg=2)),
            Case("cap", dict(b=1, h=4, w=4, d=32, k_pos=2, k_neg=4)),
            Case("masked_ptc", dict(b=2, h=5, w=5, d=32)),
            Case("cam_post", dict(s=2, f=2, b=2, k=3, h=24, w=24, flip_merge="sum", norm="max", fuse=True)),
        ]
    return [
        Case("sap", dict(b=2, h=7, w=7, d=64, c=20, k_pos=20, k_neg=5)),
        Case("cap", dict(b=2, h=7, w=7, d=64, k_pos=5, k_neg=20)),
        Case("masked_ptc", dict(b=2, h=7, w=7, d=64)),
        Case("cam_post", dict(s=2, f=2, b=2, k=5, h=64, w=64, flip_merge="sum", norm="max", fuse=True)),
    ]


def footprint(case: Case) -> dict[str, int]:
    """Estimated device bytes: the inputs (with the features' gradient) and each variant's largest live
    intermediates; a case needs the inputs plus the largest variant, since the variants run one after another.

    References: the (B, N, N) Gram matrix, its gradient and the gather's zero-filled gradient (PTC: Gram, |.|,
    gradient); CAP also sorts the (B, N, N) affinity (values and int64 indices). Official loops: the gathered
    (B, N, k, D) keys, their gradient and one accumulation buffer. cam_post: each source's ReLU copy and flip
    merge, and a few (B, K, H, W) maps. Triton: the saved similarities and the sorted gradient lists.
    """
    p = case.shape
    if case.kernel == "cam_post":
        planes = p["b"] * p["k"] * p["h"] * p["w"] * FP32
        source = p["s"] * p["f"] * planes
        sources = 2 if p["fuse"] else 1
        return {"inputs": sources * source, "reference": source + source // p["f"] + 4 * planes,
                "triton": 3 * planes}  # fmt: skip
    b, n, d = p["b"], p["h"] * p["w"], p["d"]
    gram = b * n * n * FP32
    inputs = 2 * b * d * n * FP32
    if case.kernel == "masked_ptc":
        return {"inputs": inputs, "reference": 3 * gram + 2 * b * d * n * FP32, "triton": 2 * b * d * n * FP32}
    k = p["k_pos"] + p["k_neg"]
    extra = b * (p["c"] + 1) * n * FP32 if case.kernel == "sap" else gram  # CNN CAMs or the ViT affinity
    ranking = gram * 3 if case.kernel == "cap" else 0  # sorted affinity values (fp32) and indices (int64)
    return {
        "inputs": inputs + extra,
        "reference": 3 * gram + ranking,
        "official": 3 * b * n * k * d * FP32 + gram + ranking,
        "triton": b * n * k * (2 * FP32 + 6 * INT64) + ranking,
    }


def peak_bytes(estimate: dict[str, int]) -> int:
    return estimate["inputs"] + max(v for name, v in estimate.items() if name != "inputs")


# ------------------------------------------------------------------------------------------- workloads


@contextmanager
def kernel_backend(backend: str | None) -> Iterator[None]:
    """Run library code that takes no ``backend=`` (the CoBra losses) on one kernel backend, by ``WSSS_KERNELS``
    (``wsss.kernels.dispatch``); None leaves the choice as it is."""
    if backend is None:
        yield
        return
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR)
        else:
            os.environ[ENV_VAR] = old


def _tokens(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


def sap_library(v_s, m_cnn, labels, k_pos, k_neg, tau):
    """``wsss.train.cobra_losses.sap_loss`` in ``cll_v1``'s mode: raw-CAM ranking, absent classes zeroed, every
    patch an anchor, exp before /tau in the negatives (D2)."""
    return sap_loss(_tokens(v_s), m_cnn, labels, k_pos, k_neg, tau, "raw_cam", "zero", "all", "code")


def cap_library(v_c, affinity, k_pos, k_neg, tau):
    """``wsss.train.cobra_losses.cap_loss`` (``cll_v2``'s semantics)."""
    return cap_loss(_tokens(v_c), affinity, k_pos, k_neg, tau)


def loss_workloads(case: Case, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> closure running forward + backward and returning the loss value."""
    p, g = case.shape, torch.Generator(device="cpu").manual_seed(0)
    v = F.normalize(torch.randn(p["b"], p["d"], p["h"], p["w"], generator=g), dim=1).to(device).requires_grad_(True)

    def step(loss_fn, backend=None):
        def run():
            with kernel_backend(backend):
                loss = loss_fn()
                torch.autograd.grad(loss.sum(), v)
            return loss.detach().reshape(())

        return run

    if case.kernel == "sap":
        m_cnn = torch.randn(p["b"], p["c"] + 1, p["h"], p["w"], generator=g).to(device)
        labels = (torch.rand(p["b"], p["c"], generator=g) < 0.15).float().to(device)
        args = (m_cnn, labels, p["k_pos"], p["k_neg"], 0.1)
        runs = {name: step(lambda: sap_library(v, *args), be) for name, be in BACKENDS.items()}
        runs["official"] = step(lambda: official_sap_loop(v, *args))
    elif case.kernel == "cap":
        n = p["h"] * p["w"]
        affinity = torch.rand(p["b"], n, n, generator=g).to(device)
        args = (affinity, p["k_pos"], p["k_neg"], 0.1)
        runs = {name: step(lambda: cap_library(v, *args), be) for name, be in BACKENDS.items()}
        runs["official"] = step(lambda: official_cap_loop(v, *args))
    else:  # masked_ptc
        labels = torch.randint(0, 4, (p["b"], p["h"], p["w"]), generator=g)
        labels = labels.masked_fill(labels == 3, 255).to(device)
        runs = {name: step(lambda be=be: masked_ptc(v, labels, backend=be)) for name, be in BACKENDS.items()}
    return runs


def cam_workloads(case: Case, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    p, g = case.shape, torch.Generator(device="cpu").manual_seed(0)
    size = (p["s"], p["f"], p["b"], p["k"], p["h"], p["w"])
    cams = torch.randn(size, generator=g).to(device)
    cams2 = torch.randn(size, generator=g).to(device) if p["fuse"] else None
    tags = (torch.rand(p["b"], p["k"], generator=g) < 0.2).float().to(device)

    def run(backend):
        return lambda: cam_postprocess(cams, tags, 0.5, p["flip_merge"], p["norm"], cams2, backend=backend)[2].sum()

    return {name: run(be) for name, be in BACKENDS.items()}


# ------------------------------------------------------------------------------------------- measurement


def measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> dict:
    """Median milliseconds over ``repeats`` runs after one warm-up, the value, and peak extra MiB (CUDA)."""
    value = float(fn())  # warm-up (Triton compiles here)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak = None
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        sync()
        tic = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - tic) * 1e3)
    return {"ms": statistics.median(times), "peak_mib": peak, "value": value}


def triton_runs(device: torch.device) -> bool:
    """Triton compiled on CUDA, or interpreted on CPU tensors under ``TRITON_INTERPRET=1``."""
    return triton_available() and (device.type == "cuda" or interpreter_enabled())


def bench_case(case: Case, device: torch.device, repeats: int) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached for the last case's sizes would count against this one
        torch.cuda.reset_peak_memory_stats()
    runs = cam_workloads(case, device) if case.kernel == "cam_post" else loss_workloads(case, device)
    if not triton_runs(device):
        runs.pop("triton")
    results = {name: measure(fn, device, repeats) for name, fn in runs.items()}
    ref = results["reference"]["value"]
    check = max(abs(r["value"] - ref) / max(1.0, abs(ref)) for r in results.values())
    row = {"kernel": case.kernel, "shape": case.shape, "results": results, "max_rel_diff_vs_reference": check}
    for other in ("reference", "official"):
        if device.type == "cuda" and "triton" in results and other in results:  # interpreted Triton: no speed
            row[f"{other}_over_triton"] = results[other]["ms"] / results["triton"]["ms"]
    if "official" in results:
        row["official_over_reference"] = results["official"]["ms"] / results["reference"]["ms"]
    if device.type == "cuda":  # the whole case: inputs, every variant, the caching allocator's live blocks
        row["measured_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return row


# ------------------------------------------------------------------------------------------- report


def _fmt(results: dict, name: str, key: str) -> str:
    if name not in results:
        return NA_TRITON if name == "triton" else "-"
    value = results[name][key]
    if value is None:
        return "n/a (CPU)"
    return f"{value:.2f}" if key == "ms" else f"{value:.1f}"


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def print_table(rows: list[dict]) -> None:
    header = ["kernel", "shape", "triton ms", "ref ms", "official ms", "ref/triton", "official/triton",
              "official/ref", "triton MiB", "ref MiB", "official MiB", "max rel diff"]  # fmt: skip
    lines = []
    for row in rows:
        r = row["results"]
        ratio = [f"{row[k]:.1f}x" if k in row else ("n/a" if "triton" in k else "-")
                 for k in ("reference_over_triton", "official_over_triton", "official_over_reference")]  # fmt: skip
        lines.append([row["kernel"], _shape_text(row["shape"]), _fmt(r, "triton", "ms"), _fmt(r, "reference", "ms"),
                      _fmt(r, "official", "ms"), *ratio, _fmt(r, "triton", "peak_mib"),
                      _fmt(r, "reference", "peak_mib"), _fmt(r, "official", "peak_mib"),
                      f"{row['max_rel_diff_vs_reference']:.1e}"])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 3 quick, 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the paper shapes' batch sizes")
    parser.add_argument("--max-gib", type=float, default=16.0, help="skip cases estimated above this footprint")
    add_json_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton launches on the current device
    interpreted = device.type != "cuda" and triton_runs(device)
    repeats = args.repeats or (1 if interpreted else 3 if args.quick else 10)
    cases = quick_cases(interpreted) if args.quick else paper_cases(args.scale)
    rows, skipped = [], []
    for case in cases:
        estimate = footprint(case)
        need = peak_bytes(estimate) / GIB
        print(f"{case.kernel} {_shape_text(case.shape)}: estimated footprint {need:.2f} GiB ...", flush=True)
        if need > args.max_gib:
            print(f"  skipped: above --max-gib {args.max_gib:g} (raise it, or lower --scale)")
            skipped.append({"kernel": case.kernel, "shape": case.shape, "estimated_gib": need})
            continue
        row = {**bench_case(case, device, repeats), "estimated_gib": need, "estimated_bytes": estimate}
        if row.get("measured_peak_gib", 0.0) > args.max_gib:
            print(f"  WARNING: measured peak {row['measured_peak_gib']:.2f} GiB is above --max-gib {args.max_gib:g}")
        rows.append(row)
    print()
    print_table(rows)
    name = f"bench_kernels_{device.type}{'_quick' if args.quick else ''}{'_interpreted' if interpreted else ''}"
    column = "triton (interpreter: not a speed)" if interpreted else "triton" if triton_runs(device) else NA_TRITON
    write_result(name, {"quick": args.quick, "scale": args.scale, "max_gib": args.max_gib, "repeats": repeats,
                        "triton_column": column, "rows": rows, "skipped": skipped}, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
