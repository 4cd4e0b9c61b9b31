"""The paper configs at paper shapes: two training steps, `wsss label` on 500x375 images, `wsss export --verify`.

Each config runs in its own processes (training, labeling, export), so each stage's peak RSS is its own:

    python benchmarks/paper_shapes.py                      # every paper config, CPU, random weights
    python benchmarks/paper_shapes.py --configs seco-vitb16-voc --device cuda --steps 5 --batch 4

Training keeps the config's crop, schedule length and model; the batch is reduced (``--batch``) and every loss term
is switched on from the first step (SeCo's schedule starts LIL/LIG at 1,001 and seg/reg at 2,001; CoBra's auxiliary
losses at its epoch 5), so the timed step is the steady-state step of the paper's recipe. The time per step is the
last step's (the first includes one-off allocation). Images are the synthetic benchmark's scenes resized to 500x375
with its classes, so the classifier heads have that many outputs instead of VOC's 20 or COCO's 80.
Writes ``results/paper_shapes[_DEVICE].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from common import add_json_option, write_result

PAPER_CONFIGS = ("seco-vitb16-voc", "seco-vitb16-coco", "cobra-r152-deits-voc", "cam-vitb16-voc", "seam-r50-voc",
                 "deeplab-r101-voc", "segformer-b2-voc")  # fmt: skip
SEG_CONFIGS = ("deeplab-", "segformer-")  # trained on masks (here the synthetic ground truth), served by --source seg
SIZE = (500, 375)  # width, height: the common VOC image size


def make_data(root: Path, n_train: int, n_val: int) -> Path:
    """Synthetic scenes resized to 500x375 in VOC layout (masks by nearest neighbour)."""
    from wsss.data.synth import SynthConfig, generate_synth

    generate_synth(root, SynthConfig(n_train=n_train, n_val=n_val, min_size=128, max_size=128), progress=False)
    for sub, interp in (("JPEGImages", cv2.INTER_LINEAR), ("SegmentationClass", cv2.INTER_NEAREST),
                        ("ContextMask", cv2.INTER_NEAREST)):  # fmt: skip
        for path in (root / sub).iterdir():
            if path.suffix == ".jpg":
                cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), SIZE, interpolation=interp))
            else:  # palette PNGs: resize the indices, keep the palette
                from PIL import Image

                img = Image.open(path)
                img.resize(SIZE, Image.NEAREST).save(path)
    return root


def all_terms_on(cfg: dict) -> None:
    """Every loss term of the method from step 0, at the paper's weights."""
    if cfg["method"] == "seco":
        from wsss.train.seco_state import SCHEDULES

        s = cfg["seco"]
        table = SCHEDULES[s["schedule"]] if isinstance(s["schedule"], str) else s["schedule"]
        s["schedule"] = {name: [0, weight] for name, (_, weight) in table.items()}
        s["proto_start"] = 0
    if cfg["method"] == "cobra":
        cfg["cobra"]["aux_start_epoch"] = 0


def train_steps(name: str, data: str, out: str, steps: int, batch: int, device: str) -> dict:
    """Runs in a child process: ``steps`` steps of the config; returns the per-step wall times."""
    import torch

    from wsss.data.datasets import parse_data_spec
    from wsss.train.configs import get_config
    from wsss.train.loop import train

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = get_config(name, [f"train.batch_size={batch}", "train.workers=0", "train.log_every=1",
                            "train.eval_every=0", f"train.ckpt_every={10**6}"])  # fmt: skip
    all_terms_on(cfg)
    start = time.perf_counter()
    train(cfg, parse_data_spec(data), out, device=device, progress=False, max_steps=steps)
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    per_step = np.diff([0.0, *elapsed]).round(2).tolist()
    finite = all(np.isfinite(r["loss"]) for r in records)
    return {"step_s": per_step, "total_s": round(total, 1), "finite_losses": finite, "last_loss": records[-1]["loss"]}


def run(argv: list[str], log: Path) -> dict:
    """Run a command; its wall time, exit status and peak RSS (this child's own, from wait4)."""
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    tail = log.read_text()[-1500:]
    return {"rc": code, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "tail": tail if code else tail[-300:]}  # fmt: skip


def bench_config(name: str, tmp: Path, data: Path, args) -> dict:
    out, cli = tmp / name, [sys.executable, "-m", "wsss.cli"]
    out.mkdir()
    child = [sys.executable, __file__, "--child", name, "--data", f"voc:{data}:train", "--out", str(out / "run"),
             "--steps", str(args.steps), "--batch", str(args.batch), "--device", args.device]  # fmt: skip
    row = {"config": name, "batch": args.batch, "steps": args.steps, "train": run(child, out / "train.log")}
    seg = ["--source", "seg"] if name.startswith(SEG_CONFIGS) else []
    if row["train"]["rc"] == 0:
        row["train"].update(json.loads((out / "train.json").read_text()))
        ckpt = str(out / "run" / "last.safetensors")
        row["label"] = run([*cli, "label", "--ckpt", ckpt, "--data", f"voc:{data}:val", "--out", str(out / "labels"),
                            "--refine", args.refine, "--device", args.device, "--batch", "2", "--workers", "2",
                            "--quiet", "--fail-on-error", *seg], out / "label.log")  # fmt: skip
        if row["label"]["rc"] == 0:
            summary = json.loads(next((out / "labels").glob("summary-shard-*.json")).read_text())
            row["label"].update(ok=summary["ok"], failed=summary["failed"], images_per_s=summary["images_per_s"])
        what = ["--what", "seg"] if seg else []
        row["export"] = run([*cli, "export", "--ckpt", ckpt, "--onnx", str(out / "net.onnx"), "--verify", *what],
                            out / "export.log")  # fmt: skip
    row["passed"] = all(row[k]["rc"] == 0 for k in ("train", "label", "export") if k in row) and "export" in row
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(PAPER_CONFIGS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="Reduced batch (the papers: SeCo 4, CoBra 32).")
    parser.add_argument("--images", type=int, default=3, help="500x375 images to label.")
    parser.add_argument("--refine", default="crf", choices=["crf", "par", "none"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_json_option(parser)
    args = parser.parse_args()
    if args.child:  # one config's training, in its own process
        result = train_steps(args.child, args.data, args.out, args.steps, args.batch, args.device)
        (Path(args.out).parent / "train.json").write_text(json.dumps(result))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="wsss-paper-") as tmp:
        data = make_data(Path(tmp) / "data", n_train=2 * args.batch, n_val=args.images)
        for name in args.configs:
            rows.append(bench_config(name, Path(tmp), data, args))
            r = rows[-1]
            step = r["train"].get("step_s", ["-"])[-1]
            print(f"{name:22s} step {step} s, train RSS {r['train']['peak_rss_gib']} GiB, "
                  f"label {r.get('label', {}).get('wall_s', '-')} s, export {r.get('export', {}).get('wall_s', '-')} s,"
                  f" {'passed' if r['passed'] else 'FAILED'}", flush=True)  # fmt: skip
    suffix = "" if args.device == "cpu" else "_" + args.device.replace(":", "")
    write_result(f"paper_shapes{suffix}", {"image_size": SIZE, "refine": args.refine, "rows": rows}, args.json)
    if not all(r["passed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
