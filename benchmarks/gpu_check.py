"""The prepared GPU check: every path that reaches a GPU, verified in one call, one JSON of results.

    bash benchmarks/gpu_check.sh --out gpu_check.json            # on a CUDA machine (about 8 minutes at most)
    bash benchmarks/gpu_check.sh --cpu                           # here: the same steps sized for a CPU

Each step runs in its own process group with a time limit and records passed / failed / skipped (with the reason:
no CUDA, a package that is not installed, the time budget spent), its duration and the tail of its output; steps
that write JSON have it embedded. In CPU mode every step that has a CPU form runs in it (kernels under the Triton
interpreter, a few steps on the CPU, quick benchmark sizes), so the check's own logic is known to work before a GPU
runs it; the steps that only mean something on a GPU say so. Needs only the package and its test extras, works
offline, and leaves nothing behind (all files in one temporary folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CLI = [sys.executable, "-m", "wsss.cli"]
TINY = ("cam-tiny-synth", "seco-tiny-synth", "cobra-tiny-synth")


@dataclass
class Check:
    """One step: the command per mode (None: not in that mode, with ``why``) and what passing verifies."""

    name: str
    verifies: str
    cuda: list[str] | None
    cpu: list[str] | None
    timeout_s: int = 120
    needs: tuple[str, ...] = ()  # importable modules, or "ort-cuda" / "tensorrt"
    why_not_cpu: str = "needs a CUDA GPU"
    env: dict[str, str] = field(default_factory=dict)
    after: object = None  # callable(tmp) -> dict of results to check and embed; raises AssertionError on failure


def available(need: str, mode: str) -> bool:
    """An importable module, or "ort-cuda": ONNX Runtime with its CUDA provider (on the CPU, ONNX Runtime)."""
    if need == "ort-cuda":
        if mode == "cpu":
            return importlib.util.find_spec("onnxruntime") is not None
        if importlib.util.find_spec("onnxruntime") is None:
            return False
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return importlib.util.find_spec(need) is not None


def environment() -> dict:
    import torch

    from wsss.runtime.bench import device_info

    info = {**device_info(), "cuda_version": torch.version.cuda, "triton": _version("triton")}
    for name in ("onnxruntime", "tensorrt", "pydensecrf", "timm", "onnx"):
        info[name] = _version(name)
    if info["onnxruntime"]:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    return info


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(__import__(module), "__version__", "present")
    except Exception as err:  # noqa: BLE001 - a broken install is a finding, not a crash
        return f"broken: {err}"


def run_step(check: Check, mode: str, deadline: float, tmp: Path) -> dict:
    row = {"name": check.name, "verifies": check.verifies}
    argv = check.cuda if mode == "cuda" else check.cpu
    missing = [n for n in check.needs if not available(n, mode)]
    left = deadline - time.monotonic()
    reason = (check.why_not_cpu if argv is None else f"not installed: {', '.join(missing)}" if missing
              else "time budget spent" if left < 10 else None)  # fmt: skip
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "1" if mode == "cpu" else "0", **check.env}
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=min(check.timeout_s, left))
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and every worker it started
        output, _ = proc.communicate()
        status = "timeout"
    row.update(status=status, seconds=round(time.monotonic() - start, 1), rc=proc.returncode, tail=output[-1500:])
    if status == "passed" and check.after is not None:
        try:
            row["results"] = check.after(tmp)
        except (AssertionError, OSError, ValueError, KeyError) as err:
            row.update(status="failed", reason=f"{type(err).__name__}: {err}")
    if status == "passed":
        row["tail"] = row["tail"][-400:]
    return row


def agreement(a: Path, b: Path) -> float:
    """Pixel agreement of two folders of label PNGs with the same names."""
    from PIL import Image

    names = sorted(p.name for p in a.glob("*.png"))
    assert names and names == sorted(p.name for p in b.glob("*.png")), f"{a} and {b} hold different labels"
    same = total = 0
    for name in names:
        x, y = np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name))
        same, total = same + int((x == y).sum()), total + x.size
    return same / total


def finite_metrics(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records, f"{run}: no metrics"
    bad = {k: v for r in records for k, v in r.items() if isinstance(v, float) and not np.isfinite(v)}
    assert not bad, f"{run}: non-finite {bad}"
    return {"steps": records[-1]["step"], "loss": records[-1]["loss"]}


def labels_agree(ref: str, other: str, minimum: float):
    def check(tmp: Path) -> dict:
        value = agreement(tmp / ref / "labels", tmp / other / "labels")
        assert value >= minimum, f"labels of {other} agree with {ref} on {value:.4%} of pixels (< {minimum:.2%})"
        return {"pixel_agreement": round(value, 6), "against": ref}

    return check


def embed(name: str):
    return lambda tmp: json.loads((tmp / name).read_text())


def all_terms(name: str) -> list[str]:
    """``--set`` overrides that switch every loss term of a tiny config on from its first step."""
    from paper_shapes import all_terms_on

    from wsss.train.configs import get_config

    cfg = get_config(name)
    all_terms_on(cfg)
    if cfg["method"] == "seco":
        return ["--set", f"seco.schedule={json.dumps(cfg['seco']['schedule'])}", "--set", "seco.proto_start=0"]
    return ["--set", "cobra.aux_start_epoch=0"] if cfg["method"] == "cobra" else []


def checks(tmp: Path) -> list[Check]:
    data, d = f"voc:{tmp}/synth", str(tmp)
    py, seco = sys.executable, f"{d}/seco-tiny-synth/last.safetensors"
    kernel_tests = [py, "-m", "pytest", "-q", "-x", "tests/test_kernels.py", "tests/test_kernel_paths.py"]
    label = [*CLI, "label", "--ckpt", seco, "--data", f"{data}:val", "--quiet", "--fail-on-error"]
    par_label = [*label, "--refine", "par"]
    crf_label = [*label, "--refine", "crf", "--crf-impl", "torch"]
    bench_label = [*CLI, "bench", "label", "--ckpt", seco, "--data", f"{data}:val", "--refine", "par"]
    backends = "torch,onnx" if available("ort-cuda", "cuda") else "torch"
    seco_step = [py, "benchmarks/bench_seco_step.py", "--data", f"{tmp}/synth", "--json", f"{d}/bench_seco_step.json"]
    paper_seco = [py, "benchmarks/paper_shapes.py", "--configs", "seco-vitb16-voc", "--device", "cuda", "--steps",
                  "6", "--batch", "4", "--refine", "par", "--json", f"{d}/paper_seco.json"]  # fmt: skip
    onnx_label = [py, "-c", _ONNX_LABEL, seco, data, d]
    pipeline = [py, "benchmarks/bench_pipeline.py", "--json", f"{d}/bench_pipeline.json"]
    return [
        Check("kernel-tests", "Triton kernels compiled for this GPU (no interpreter) against their torch references",
              kernel_tests, kernel_tests, timeout_s=240),
        Check("gpu-tests", "the suite's CUDA-only tests (marker gpu): sync-free steps, device selection, the "
              "TensorRT runner, ONNX Runtime IO binding, labels on CUDA against the CPU's",
              [py, "-m", "pytest", "-q", "-m", "gpu", "tests"], None, timeout_s=240,
              why_not_cpu="every test marked gpu skips without CUDA (the suite runs them as skips)"),
        Check("bench-kernels", "kernel speed and memory against the references (fits a 24 GB RTX 3090)",
              [py, "benchmarks/bench_kernels.py", "--repeats", "3", "--json", f"{d}/bench_kernels.json"],
              [py, "benchmarks/bench_kernels.py", "--quick", "--json", f"{d}/bench_kernels.json"],
              timeout_s=150, after=embed("bench_kernels.json")),
        *(Check(f"train-{name}", f"{name}: bf16-AMP training steps with every loss term on, each logged loss finite",
                [*train_command(name, data, d), "--device", "cuda", "--set", "train.iters=6"],
                [*train_command(name, data, d), "--device", "cpu", "--set", "train.iters=2", "--set",
                 "train.batch_size=4"], timeout_s=180, after=lambda t, n=name: finite_metrics(t / n))
          for name in TINY),
        Check("label-cpu", "reference labels on the CPU (PAR refinement), for the GPU runs to agree with",
              [*par_label, "--out", f"{d}/label-cpu", "--device", "cpu"],
              [*par_label, "--out", f"{d}/label-cpu", "--device", "cpu"]),
        Check("label-cuda-par", "wsss label on CUDA: Triton CAM post-processing and PAR on the device",
              [*par_label, "--out", f"{d}/label-cuda", "--device", "cuda"], None,
              after=labels_agree("label-cpu", "label-cuda", 0.995)),
        Check("label-cuda-bf16", "wsss label with a bf16 network forward: labels agree with the fp32 CPU run",
              [*par_label, "--out", f"{d}/label-bf16", "--device", "cuda", "--precision", "bf16"], None,
              after=labels_agree("label-cpu", "label-bf16", 0.97)),
        Check("label-crf-cpu", "reference dense-CRF labels: the torch lattice on the CPU",
              [*crf_label, "--out", f"{d}/crf-cpu", "--device", "cpu"],
              [*crf_label, "--out", f"{d}/crf-cpu", "--device", "cpu"]),
        Check("label-crf-cuda", "the torch dense CRF batched on the GPU (only uint8 labels copied back) agrees with "
              "the CPU's", [*crf_label, "--out", f"{d}/crf-cuda", "--device", "cuda"], None,
              after=labels_agree("crf-cpu", "crf-cuda", 0.999)),
        Check("label-crf-pydensecrf", "pydensecrf in the process pool agrees with the torch lattice",
              [*label, "--out", f"{d}/crf-pdc", "--refine", "crf", "--crf-impl", "pydensecrf", "--device", "cuda"],
              [*label, "--out", f"{d}/crf-pdc", "--refine", "crf", "--crf-impl", "pydensecrf", "--device", "cpu"],
              needs=("pydensecrf",), after=labels_agree("crf-cpu", "crf-pdc", 0.999)),
        Check("bench-label", f"wsss bench label on the device ({backends}) against the research loop",
              [*bench_label, "--images", "32", "--batch", "8,16", "--backends", backends, "--device", "cuda",
               "--json", f"{d}/bench_label.json"],
              [*bench_label, "--images", "4", "--batch", "2", "--backends", "torch,onnx", "--device", "cpu",
               "--json", f"{d}/bench_label.json"], timeout_s=240, after=embed("bench_label.json")),
        Check("bench-label-crf", "wsss bench label with the torch dense CRF on the device: does refinement still "
              "bound the run (the stage timeline says)",
              [*CLI, "bench", "label", "--ckpt", seco, "--data", f"{data}:val", "--refine", "crf", "--crf-impl",
               "torch", "--images", "32", "--batch", "16", "--backends", "torch", "--device", "cuda", "--json",
               f"{d}/bench_label_crf.json"],
              [*CLI, "bench", "label", "--ckpt", seco, "--data", f"{data}:val", "--refine", "crf", "--crf-impl",
               "torch", "--images", "4", "--batch", "2", "--backends", "torch", "--device", "cpu", "--json",
               f"{d}/bench_label_crf.json"], timeout_s=180, after=embed("bench_label_crf.json")),
        Check("bench-seco-step", "SeCo's paper-config step in its training precision, vectorised vs loop losses",
              [*seco_step, "--config", "seco-vitb16-voc", "--device", "cuda"],
              [*seco_step, "--quick", "--device", "cpu"], timeout_s=180, after=embed("bench_seco_step.json")),
        Check("onnx-cuda", "ONNX export, then labels through ONNX Runtime's CUDA provider (IO binding) agree with "
              "torch's", [*onnx_label, "cuda"], [*onnx_label, "cpu"], timeout_s=180, needs=("ort-cuda",),
              after=labels_agree("label-cpu", "label-onnx", 0.995)),
        Check("tensorrt", "a TensorRT engine built from the ONNX file, verified against ONNX Runtime at min/opt/max",
              [*CLI, "export", "--ckpt", seco, "--onnx", f"{d}/trt.onnx", "--trt", f"{d}/net.engine", "--verify"],
              None, timeout_s=240, needs=("tensorrt",)),
        Check("paper-seco-step", "seco-vitb16-voc at 448, batch 4 (the paper's), every loss term on: s/step beside "
              "SeCo's 1.61 s/iteration on an RTX 3090", paper_seco, None, timeout_s=300,
              after=embed("paper_seco.json"),
              why_not_cpu="benchmarks/paper_shapes.py measures it on the CPU (minutes per step)"),
        Check("bench-pipeline", "wsss bench pipeline at the paper configs and batches: minutes per stage of SeCo, "
              "CoBra and CAM, ours and official style, beside Table 4 (RTX 3090)",
              [*pipeline, "--device", "cuda", "--warmup", "2", "--steps", "3", "--images", "4", "--workers", "8"],
              [*pipeline, "--tiny", "--methods", "cam", "--warmup", "1", "--steps", "1", "--images", "2",
               "--warmup-images", "0", "--batch", "4"], timeout_s=420, after=embed("bench_pipeline.json")),
    ]  # fmt: skip


def train_command(name: str, data: str, d: str) -> list[str]:
    return [*CLI, "train", "--config", name, "--data", f"{data}:train", "--out", f"{d}/{name}", "--set",
            "train.log_every=1", *all_terms(name)]  # fmt: skip


# Export the checkpoint, then label the val images through ONNX Runtime on the given device.
_ONNX_LABEL = """
import subprocess, sys
ckpt, data, d, device = sys.argv[1:5]
cli = [sys.executable, "-m", "wsss.cli"]
subprocess.run([*cli, "export", "--ckpt", ckpt, "--onnx", d + "/net.onnx"], check=True)
subprocess.run([*cli, "label", "--engine", d + "/net.onnx", "--data", data + ":val", "--out", d + "/label-onnx",
                "--refine", "par", "--device", device, "--quiet", "--fail-on-error"], check=True)
"""


def make_data(root: Path) -> None:
    from wsss.data.synth import SynthConfig, generate_synth

    generate_synth(root, SynthConfig(n_train=64, n_val=16), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="Run the CPU form of every step (no GPU needed).")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/gpu_check[_cpu].json).")
    parser.add_argument("--budget-s", type=float, default=480, help="Total time; later steps skip when it is spent.")
    parser.add_argument("--only", nargs="+", default=None, help="Run only these steps (by name).")
    args = parser.parse_args()
    import torch

    mode = "cpu" if args.cpu else "cuda"
    if mode == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible; run with --cpu to check the check itself")
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_check{'_cpu' if args.cpu else ''}.json"
    start, deadline = time.time(), time.monotonic() + args.budget_s
    rows = []
    with tempfile.TemporaryDirectory(prefix="wsss-gpu-check-") as tmp:
        make_data(Path(tmp) / "synth")
        for check in checks(Path(tmp)):
            if args.only and check.name not in args.only:
                continue
            rows.append(run_step(check, mode, deadline, Path(tmp)))
            r = rows[-1]
            print(f"{r['name']:24s} {r['status']:8s} {r.get('seconds', 0):6.1f}s  {r.get('reason', '')}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "timeout", "skipped")}
    report = {"check": "gpu_check", "mode": mode, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "wall_s": round(time.time() - start, 1), "environment": environment(), "counts": counts,
              "steps": rows}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{counts} -> {out}")
    sys.exit(1 if counts["failed"] or counts["timeout"] else 0)


if __name__ == "__main__":
    main()
