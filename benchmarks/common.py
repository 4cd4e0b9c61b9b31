"""Shared helpers for benchmark scripts: device description and JSON results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

import wsss

RESULTS = Path(__file__).resolve().parent / "results"


def device_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wsss": wsss.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json`` with the payload, device info and a timestamp; return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device_info(), **payload}
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return path
