"""Shared helpers for benchmark scripts: device description and JSON results."""

from __future__ import annotations

import json
import time
from pathlib import Path

from wsss.runtime.bench import device_info

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict, path: Path | None = None) -> Path:
    """Write the payload with device info and a timestamp to ``path`` (default ``results/<name>.json``)."""
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device_info(), **payload}
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return path


def add_json_option(parser) -> None:
    """``--json PATH``: where the results go instead of ``results/<name>.json`` (the GPU check uses it)."""
    parser.add_argument("--json", type=Path, default=None, help="Results file (default: results/NAME.json).")
