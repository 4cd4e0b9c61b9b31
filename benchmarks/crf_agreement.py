"""The torch dense CRF (wsss.cam.crf_torch) against pydensecrf: argmax agreement, mIoU difference, time per image.

Data: a small synthetic benchmark (``generate_synth``, demo corpus) written to a temporary folder. Its val masks are
refined from CAM-like seeds made by degrading the ground truth, not by a model: each object is eroded or dilated by
a random 2-6 px, three random blocks of 1/6 the image side become unsure (255), and the truth's 255 band stays
unsure. The tags are the classes in the truth. Two sets:

* ``native``: the synthetic scenes at their own size (96-128 px);
* ``real_size``: the same scenes resized to 500x375 (image bilinear, truth and seed nearest): the size of a VOC
  image, not real photographs.

Both CRFs run the label CRF of ``--preset`` (default ``seed``, §5.3 row C) through ``refine_seed_crf``: pydensecrf
one image at a time in one process and in a pool of 2, torch in batches of ``--batch`` with 1 and 2 intra-op
threads. ``exact_vs_pydensecrf`` quantifies the lattice approximation itself on 40x48 crops: the exact O(N^2)
Gaussian kernels against pydensecrf. ``memory`` is the peak RSS of a fresh process refining 8 real-size images in
one batch. The machine is shared, so the load average is recorded beside the times.

    python benchmarks/crf_agreement.py              # about 2 minutes on 2 cores
    python benchmarks/crf_agreement.py --quick      # a smoke run, about 1 minute
    python benchmarks/crf_agreement.py --device cuda  # the torch CRF on a GPU (pydensecrf2 must be installed)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from common import add_json_option, write_result
from wsss.cam import crf
from wsss.cam.crf_torch import dense_crf_batch, refine_seed_crf_batch
from wsss.data.io import decode_image
from wsss.data.palette import read_label_png
from wsss.data.synth import SynthConfig, generate_synth
from wsss.eval.metrics import ConfusionMatrix

REAL_SIZE = (500, 375)  # width, height
GOAL = {"agreement": 0.99, "miou_diff_points": 0.3}


def load_val(root: Path) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    images = [decode_image(root / "JPEGImages" / f"{i}.jpg") for i in ids]
    truths = [read_label_png(root / "SegmentationClass" / f"{i}.png") for i in ids]
    return images, truths, len((root / "classes.txt").read_text().split())


def cam_like_seed(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The truth degraded as described in the module docstring."""
    seed = np.zeros_like(truth)
    for c in np.setdiff1d(np.unique(truth), [0, 255]):
        k = 2 * int(rng.integers(2, 7)) + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = (truth == c).astype(np.uint8)
        seed[(cv2.erode if rng.random() < 0.5 else cv2.dilate)(mask, kernel) > 0] = c
    h, w = truth.shape
    for _ in range(3):
        y, x = rng.integers(0, h), rng.integers(0, w)
        seed[y : y + h // 6, x : x + w // 6] = 255
    seed[truth == 255] = 255
    return seed


def tags_of(truth: np.ndarray, num_classes: int) -> np.ndarray:
    tags = np.zeros(num_classes - 1, bool)
    fg = np.setdiff1d(np.unique(truth), [0, 255])
    tags[fg - 1] = True
    return tags


def resize_set(images, truths, seeds):
    up = [cv2.resize(im, REAL_SIZE, interpolation=cv2.INTER_LINEAR) for im in images]
    near = [[cv2.resize(m, REAL_SIZE, interpolation=cv2.INTER_NEAREST) for m in ms] for ms in (truths, seeds)]
    return up, *near


def _pdc_one(args):
    image, seed, tags, preset = args
    return crf.refine_seed_crf(image, seed, tags, preset)


def run_pydensecrf(images, seeds, tags, preset: str, processes: int) -> tuple[list[np.ndarray], float]:
    """One process, or a pool of fresh (spawned) processes started and warmed up before the clock starts."""
    jobs = [(im, s, t, preset) for im, s, t in zip(images, seeds, tags, strict=True)]
    if processes == 1:
        start = time.perf_counter()
        return [_pdc_one(j) for j in jobs], time.perf_counter() - start
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_pdc_one, jobs[:processes], chunksize=1)
        start = time.perf_counter()
        out = pool.map(_pdc_one, jobs, chunksize=1)
        return out, time.perf_counter() - start


def run_torch(images, seeds, tags, args, threads: int) -> tuple[list[np.ndarray], float]:
    """Batches of ``args.batch`` on ``args.device``; the uint8 labels come back to the host (a sync per batch)."""
    torch.set_num_threads(threads)
    refine_seed_crf_batch(images[:1], seeds[:1], tags[:1], args.preset, args.device)  # warm-up
    out = []
    start = time.perf_counter()
    for i in range(0, len(images), args.batch):
        sl = slice(i, i + args.batch)
        out += [
            m.cpu().numpy() for m in refine_seed_crf_batch(images[sl], seeds[sl], tags[sl], args.preset, args.device)
        ]
    return out, time.perf_counter() - start


def miou(preds, truths, num_classes: int) -> float:
    cm = ConfusionMatrix(num_classes)
    for p, t in zip(preds, truths, strict=True):
        cm.update(p, t)
    return 100.0 * cm.compute()["miou"]


def compare(name: str, images, truths, seeds, num_classes: int, args) -> dict:
    tags = [tags_of(t, num_classes) for t in truths]
    ref, t_ref1 = run_pydensecrf(images, seeds, tags, args.preset, 1)
    _, t_ref2 = run_pydensecrf(images, seeds, tags, args.preset, 2)
    ours, times = None, {}
    for threads in (1, 2):
        ours, times[threads] = run_torch(images, seeds, tags, args, threads)
    n = len(images)
    agree = float(np.mean(np.concatenate([(a == b).ravel() for a, b in zip(ours, ref, strict=True)])))
    m_ref, m_ours = miou(ref, truths, num_classes), miou(ours, truths, num_classes)
    row = {
        "images": n, "size": f"{images[0].shape[1]}x{images[0].shape[0]}" if name == "real_size" else "96-128 px",
        "pixel_agreement": agree, "miou_pydensecrf": m_ref, "miou_torch": m_ours,
        "miou_diff_points": abs(m_ours - m_ref),
        "ms_per_image": {"pydensecrf_1_process": 1e3 * t_ref1 / n, "pydensecrf_pool_2": 1e3 * t_ref2 / n,
                         "torch_1_thread": 1e3 * times[1] / n, "torch_2_threads": 1e3 * times[2] / n},
    }  # fmt: skip
    row["speed_vs_pydensecrf"] = {
        "1_core": row["ms_per_image"]["pydensecrf_1_process"] / row["ms_per_image"]["torch_1_thread"],
        "2_cores": row["ms_per_image"]["pydensecrf_pool_2"] / row["ms_per_image"]["torch_2_threads"],
    }
    print(f"{name}: agreement {agree:.5f}, mIoU pydensecrf {m_ref:.2f} torch {m_ours:.2f}, "
          f"ms/image {', '.join(f'{k} {v:.0f}' for k, v in row['ms_per_image'].items())}")  # fmt: skip
    return row


def exact_vs_pydensecrf(images, seeds, truths, num_classes: int, preset: str) -> dict:
    """The lattice's own approximation: exact Gaussian kernels vs pydensecrf on 40x48 resized scenes."""
    params, utils = crf.CRF_PRESETS[preset], crf._pydensecrf()[1]
    agree, mean_diff = [], []
    for image, seed, truth in zip(images, seeds, truths, strict=True):
        image = cv2.resize(image, (48, 40), interpolation=cv2.INTER_AREA)
        seed = cv2.resize(seed, (48, 40), interpolation=cv2.INTER_NEAREST)
        keys = np.concatenate([[0], np.flatnonzero(tags_of(truth, num_classes)) + 1])
        if len(keys) == 1:
            continue
        lut = np.zeros(256, np.int64)
        lut[keys] = np.arange(1, len(keys) + 1)
        unary = utils.unary_from_labels(lut[seed], len(keys), gt_prob=params.gt_prob, zero_unsure=True)
        ref = crf.dense_crf(image, unary, params)
        exact = dense_crf_batch([image], [unary.reshape(len(keys), 40, 48)], params, exact=True)[0].numpy()
        agree.append((ref.argmax(0) == exact.argmax(0)).mean())
        mean_diff.append(np.abs(ref - exact).mean())
    return {"images": len(agree), "size": "48x40", "pixel_agreement": float(np.mean(agree)),
            "mean_marginal_diff": float(np.mean(mean_diff))}  # fmt: skip


def _rss_child(images, seeds, tags, preset, queue) -> None:
    torch.set_num_threads(2)
    base = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    refine_seed_crf_batch(images, seeds, tags, preset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"batch": len(images), "rss_before_mib": base / 2**20, "peak_rss_mib": peak / 2**20})


def memory(images, seeds, tags, preset: str) -> dict:
    ctx = mp.get_context("spawn")  # a fresh process: its peak RSS is this batch's, and no forked torch threads
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(images, seeds, tags, preset, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-native", type=int, default=60, help="synthetic val images at native size")
    parser.add_argument("--n-real", type=int, default=16, help="of those, resized to 500x375")
    parser.add_argument("--preset", default="seed", choices=sorted(crf.CRF_PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="where the torch CRF runs (cuda: pydensecrf still on the CPU)")
    parser.add_argument("--quick", action="store_true", help="6 native, 2 real-size images")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.n_native, args.n_real = 6, 2
    with tempfile.TemporaryDirectory() as tmp:
        generate_synth(tmp, SynthConfig(n_train=1, n_val=args.n_native), progress=False)
        images, truths, num_classes = load_val(Path(tmp))
    rng = np.random.default_rng(0)
    seeds = [cam_like_seed(t, rng) for t in truths]
    load_before = os.getloadavg()
    sets = {"native": compare("native", images, truths, seeds, num_classes, args)}
    big = resize_set(images[: args.n_real], truths[: args.n_real], seeds[: args.n_real])
    sets["real_size"] = compare("real_size", big[0], big[1], big[2], num_classes, args)
    sets["exact_vs_pydensecrf"] = exact_vs_pydensecrf(images[:8], seeds[:8], truths[:8], num_classes, args.preset)
    big8 = resize_set(images[:8], truths[:8], seeds[:8])
    sets["memory"] = memory(big8[0], big8[2], [tags_of(t, num_classes) for t in big8[1]], args.preset)
    print(sets["exact_vs_pydensecrf"], sets["memory"])
    name = "crf_agreement" + ("_quick" if args.quick else "") + ("" if args.device == "cpu" else f"_{args.device}")
    record = {"preset": args.preset, "batch": args.batch, "torch_device": args.device, "memory_device": "cpu",
              "seeds": "ground truth degraded (see the script's docstring)", "goal": GOAL,
              "load_average_before_after": [load_before, os.getloadavg()]}  # fmt: skip
    write_result(name, {**record, **sets})


if __name__ == "__main__":
    main()
