"""Shared helpers for benchmark scripts: device description and JSON results."""

from __future__ import annotations

import json
import time
from pathlib import Path

from wsss.runtime.bench import device_info

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json`` with the payload, device info and a timestamp; return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device_info(), **payload}
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return path
