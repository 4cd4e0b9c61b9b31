"""The prepared GPU check's own logic (benchmarks/gpu_check.py): statuses, skips with reasons, time limits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_check import Check, agreement, run_step  # noqa: E402

PY = sys.executable


def _run(check: Check, tmp_path: Path, mode: str = "cpu", budget: float = 60) -> dict:
    return run_step(check, mode, time.monotonic() + budget, tmp_path)


def test_passing_failing_and_checked_steps(tmp_path):
    ok = Check("ok", "exits 0", None, [PY, "-c", "print('fine')"])
    assert _run(ok, tmp_path)["status"] == "passed"
    bad = Check("bad", "exits 3", None, [PY, "-c", "import sys; sys.exit(3)"])
    row = _run(bad, tmp_path)
    assert row["status"] == "failed" and row["rc"] == 3

    def refuse(tmp):
        raise AssertionError("labels disagree")

    checked = Check("checked", "exits 0, result refused", None, [PY, "-c", "pass"], after=refuse)
    row = _run(checked, tmp_path)
    assert row["status"] == "failed" and "labels disagree" in row["reason"]


def test_skips_say_why(tmp_path):
    gpu_only = Check("gpu", "needs CUDA", [PY, "-c", "pass"], None, why_not_cpu="meaningless on a CPU")
    assert _run(gpu_only, tmp_path) == {"name": "gpu", "verifies": "needs CUDA", "status": "skipped",
                                        "reason": "meaningless on a CPU"}  # fmt: skip
    missing = Check("trt", "needs a package", None, [PY, "-c", "pass"], needs=("no_such_module_xyz",))
    assert _run(missing, tmp_path)["reason"] == "not installed: no_such_module_xyz"
    late = Check("late", "after the budget", None, [PY, "-c", "pass"])
    assert _run(late, tmp_path, budget=5)["reason"] == "time budget spent"


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); open({str(marker)!r}, 'w')"
        ".write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    row = _run(Check("slow", "sleeps", None, [PY, "-c", code], timeout_s=3), tmp_path)
    assert row["status"] == "timeout" and row["seconds"] < 20
    status = Path(f"/proc/{int(marker.read_text())}/status")
    time.sleep(0.5)  # the grandchild went with the step's process group (gone, or a zombie awaiting its reaper)
    assert not status.exists() or "zombie" in status.read_text()


def test_label_agreement(tmp_path):
    for name, value in (("a", 1), ("b", 1)):
        (tmp_path / name).mkdir()
        label = np.zeros((4, 5), np.uint8)
        label[0, :value] = 2
        Image.fromarray(label).save(tmp_path / name / "x.png")
    assert agreement(tmp_path / "a", tmp_path / "b") == 1.0
    label = np.zeros((4, 5), np.uint8)
    label[:2] = 3
    Image.fromarray(label).save(tmp_path / "b" / "x.png")
    assert agreement(tmp_path / "a", tmp_path / "b") == pytest.approx(10 / 20)


def test_every_step_has_a_cpu_form_or_a_reason(tmp_path):
    steps = gpu_check.checks(tmp_path)
    assert len({c.name for c in steps}) == len(steps)
    for c in steps:
        assert c.cuda is not None, f"{c.name}: the GPU check must run every step on a GPU"
        assert c.cpu is not None or c.why_not_cpu, c.name
