"""Shared helpers for benchmark scripts: device description, JSON results, charts and val seed scores."""

from __future__ import annotations

import json
import time
from pathlib import Path

from wsss.data.datasets import VOCDataset
from wsss.eval.evaluate import evaluate_folders
from wsss.models import CAMSettings
from wsss.runtime.backends import open_backend
from wsss.runtime.bench import device_info
from wsss.runtime.labeler import LabelConfig, label_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict, path: Path | None = None) -> Path:
    """Write the payload with device info and a timestamp to ``path`` (default ``results/<name>.json``)."""
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device_info(), **payload}
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return path


def val_seed_scores(ckpt: Path, data: Path, out: Path, split: str = "val", background: float | None = None,
                    refine: str = "none", cam: CAMSettings | None = None) -> dict:  # fmt: skip
    """Seeds of ``split`` by the batch labeler with the network's own CAM settings (CoBra: its fused CAM, the
    config's seed source; ``cam`` replaces those settings, ``background`` their threshold) in ``out/seeds``, scored
    against the set's masks and context regions. With ``refine`` (``crf``: the labeler's default, §5.3 row C;
    ``par``) the same pass also writes the refined labels to ``out/labels``, scored under ``"labels"``.

    Returns mIoU, per-class IoU and precision (lists, background first), the class names and the context false
    activation overall and per class (by name)."""
    backend, spec, meta = open_backend(ckpt)
    val = VOCDataset(data, split)
    cam = cam or spec.cam
    cam = cam if background is None else cam.with_background(background)
    labels = "labels" if refine != "none" else None
    label_dataset(backend, spec, meta, val, out, LabelConfig(cam, refine=refine, seed_dir="seeds", label_dir=labels,
                                                             quiet=True, resume=True))  # fmt: skip
    names = list(spec.class_names)
    scores = {**_folder_scores(out / "seeds", data, names, val.ids), "class_names": names}
    return {**scores, "labels": _folder_scores(out / labels, data, names, val.ids)} if labels else scores


def _folder_scores(pred: Path, data: Path, names: list[str], ids: list[str]) -> dict:
    res = evaluate_folders(pred, data / "SegmentationClass", names, context_dir=data / "ContextMask", ids=ids)
    fa = res["context_false_activation"]
    return {"miou": res["miou"], "context_false_activation": fa["overall"], "iou": res["iou"],
            "precision": res["precision"],
            "context_false_activation_per_class": {names[int(k)]: v for k, v in fa["per_class"].items()}}  # fmt: skip


def add_json_option(parser) -> None:
    """``--json PATH``: where the results go instead of ``results/<name>.json`` (the GPU check uses it)."""
    parser.add_argument("--json", type=Path, default=None, help="Results file (default: results/NAME.json).")


def method_chart(path: Path, title: str, runs: dict[str, dict], metrics: dict[str, str] | None = None) -> Path:
    """A PNG with one panel per metric: a bar per method at its mean over training seeds, each seed a dot.

    ``runs`` maps a method to {seed: result}; ``metrics`` maps a result key (a fraction) to its axis label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics or {"miou": "val seed mIoU (%)", "context_false_activation": "context false activation (%)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    names = list(runs)
    for ax, (key, label) in zip(axes[0], metrics.items(), strict=True):
        for i, name in enumerate(names):
            values = [100 * r[key] for r in runs[name].values()]
            mean = sum(values) / len(values)
            ax.bar(i, mean, color=f"C{i}", alpha=0.55)
            ax.scatter([i] * len(values), values, color="black", s=14, zorder=3)
            ax.text(i, mean / 2, f"{mean:.1f}", ha="center", va="center", fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(f"{title} (bars: mean over {len(next(iter(runs.values())))} training seeds; dots: each seed)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path
