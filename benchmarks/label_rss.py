"""Resident memory of a long ``label_dataset`` run: RSS recorded every ``--every`` images, as JSON and a PNG curve.

The run labels ``--images`` items in this process (the labeler's loader, CRF pool and writer threads as in
``wsss label``) while a thread samples the RSS of this process (``VmRSS`` of ``/proc/self/status``) and of it with
all its worker processes, and reads how many items the journal holds. Flat curves mean no per-image growth.

Data: ``--distinct`` small synthetic images (``generate_synth``, 48-64 px) listed over and over under distinct ids,
with their tags; the network: the tiny CAM configuration of the tests, trained for 2 iterations (its weights do not
change the memory profile), unless ``--ckpt`` names one.

    python benchmarks/label_rss.py                          # 10,000 images, --refine none
    python benchmarks/label_rss.py --images 2000 --refine par
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw

from common import RESULTS, add_json_option, write_result
from wsss.data.datasets import VOCDataset, WSSSDataset
from wsss.data.synth import SynthConfig, generate_synth
from wsss.runtime.backends import open_backend
from wsss.runtime.labeler import LabelConfig, label_dataset
from wsss.train.configs import get_config
from wsss.train.loop import train

TINY = [
    'model.backbone.overrides={"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}',
    "model.backbone.img_size=48", "pretrained=null", "data.crop=48", "train.batch_size=4", "train.iters=2",
    "cam.input_size=48", "cam.scales=[1.0,0.5]",
]  # fmt: skip


def rss_mb(pid: int | str = "self") -> float:
    """VmRSS of a process in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(root: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


class Sampler(threading.Thread):
    """Samples (seconds, journal items, RSS, RSS with workers) every ``period`` seconds until stopped."""

    def __init__(self, journal: Path, period: float = 0.05, refresh: int = 40) -> None:
        super().__init__(daemon=True)
        self.journal, self.period, self.refresh, self.samples = journal, period, refresh, []
        self.stopped = threading.Event()

    def run(self) -> None:
        start, workers = time.perf_counter(), []
        while not self.stopped.is_set():  # often enough to catch the last item before the pools shut down
            if len(self.samples) % self.refresh == 0:  # the process tree, walked every ``refresh`` samples
                workers = descendants(os.getpid())
            done = self.journal.read_bytes().count(b"\n") if self.journal.exists() else 0
            own = rss_mb()
            self.samples.append((time.perf_counter() - start, done, own, own + sum(map(rss_mb, workers))))
            self.stopped.wait(self.period)


def repeated(data: WSSSDataset, n: int) -> WSSSDataset:
    """``n`` items cycling over ``data``'s images (with their tags) under distinct ids."""
    ids = [f"item{i:06d}" for i in range(n)]
    src = [i % len(data) for i in range(n)]
    return WSSSDataset(data.classes, ids, [data.image_path(j) for j in src], None,
                       {k: data.labels(j) for k, j in zip(ids, src, strict=True)})  # fmt: skip


def checkpoints(samples: list[tuple], every: int, total: int) -> list[dict]:
    """The first sample at or past each multiple of ``every`` (and the last one)."""
    marks = [*range(every, total + 1, every)] or [total]
    points = []
    for mark in marks:
        s = next((s for s in samples if s[1] >= mark), samples[-1])
        points.append({"images": s[1], "seconds": round(s[0], 2), "rss_mb": round(s[2], 1),
                       "rss_with_workers_mb": round(s[3], 1)})  # fmt: skip
    return points


def plot(points: list[dict], path: Path, title: str) -> None:
    """A line chart of RSS (this process, and with its workers) against images, drawn with PIL."""
    w, h, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    xs = [p["images"] for p in points]
    ys = [p[k] for p in points for k in ("rss_mb", "rss_with_workers_mb")]
    x_max, y_max = max(xs), max(ys) * 1.15

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (w - left - right) * x / x_max, h - bottom - (h - top - bottom) * y / y_max

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        y = y_max * i / 5
        draw.line([at(0, y), at(x_max, y)], fill=(225, 225, 225))
        draw.text((5, at(0, y)[1] - 6), f"{y:6.0f} MB", fill="black")
    for x in xs:
        draw.text((at(x, 0)[0] - 14, h - bottom + 6), f"{x:,}", fill="black")
    for key, colour in (("rss_mb", (31, 119, 180)), ("rss_with_workers_mb", (214, 39, 40))):
        line = [at(p["images"], p[key]) for p in points]
        if len(line) > 1:
            draw.line(line, fill=colour, width=3)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    draw.text((left, 10), title, fill="black")
    draw.text((left, 24), "blue: this process   red: with its worker processes", fill="black")
    draw.text((w // 2 - 20, h - 22), "images labelled", fill="black")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000, help="Record the RSS every this many images.")
    parser.add_argument("--refine", choices=["none", "par", "crf"], default="none")
    parser.add_argument("--distinct", type=int, default=64, help="Distinct synthetic images the items cycle over.")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ckpt", type=Path, default=None, help="A checkpoint (default: a tiny one trained here).")
    parser.add_argument("--png", type=Path, default=RESULTS / "label_rss.png")
    add_json_option(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_synth(tmp / "synth", SynthConfig(n_train=8, n_val=args.distinct, min_size=48, max_size=64),
                       progress=False)  # fmt: skip
        ckpt = args.ckpt or train(get_config("cam-tiny-synth", TINY), VOCDataset(tmp / "synth", "train"),
                                  tmp / "run", progress=False)  # fmt: skip
        backend, spec, meta = open_backend(ckpt)
        data = repeated(VOCDataset(tmp / "synth", "val"), args.images)
        cfg = LabelConfig(spec.cam, args.refine, batch=args.batch, workers=args.workers, quiet=True)
        out = tmp / "labels"
        sampler = Sampler(out / "journal" / "shard-0-of-1.jsonl")
        rss_before = rss_mb()
        sampler.start()
        summary = label_dataset(backend, spec, meta, data, out, cfg)
        sampler.stopped.set()
        sampler.join()
    points = checkpoints(sampler.samples, args.every, args.images)
    first, last = points[0], points[-1]
    result = {
        "images": args.images, "refine": args.refine, "batch": args.batch, "workers": args.workers,
        "distinct_images": args.distinct, "ok": summary["ok"], "images_per_s": summary["images_per_s"],
        "rss_before_mb": round(rss_before, 1), "points": points,
        "growth_mb": {k: round(last[k] - first[k], 1) for k in ("rss_mb", "rss_with_workers_mb")},
        "peak_mb": {k: round(max(s[i] for s in sampler.samples), 1) for i, k in
                    ((2, "rss_mb"), (3, "rss_with_workers_mb"))},
        "timeline": summary["timeline"],
    }  # fmt: skip
    print(f"{summary['ok']} images at {summary['images_per_s']} images/s; RSS {first['rss_mb']} -> {last['rss_mb']} "
          f"MB (with workers {first['rss_with_workers_mb']} -> {last['rss_with_workers_mb']} MB)")  # fmt: skip
    write_result("label_rss", result, args.json)
    plot(points, args.png, f"wsss label RSS over {args.images:,} images (--refine {args.refine})")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
