"""The labeler on a local Ray cluster against the local labeler, same machine, same settings, one run each.

The overhead of the engine: images/second of ``label_on_ray`` (a local cluster with this machine's CPUs, the
network in ``--replicas`` actors of one CPU each, decoding, CRF and writing in CPU tasks) over that of
``label_dataset`` (its loader, CRF pool and writer threads, ``--workers``). The Ray figure counts the pipeline
from its start (actor start-up included) to the last journal record; the cluster's start and the one-off opening
of the network on a replica (``open_network``) are reported apart. Labels of the two runs are compared file by file.

Data: ``--images`` synthetic images (``generate_synth``, ``--min-size`` to ``--max-size`` px) with their tags; the
network: the tiny CAM configuration of the tests trained for 2 iterations, unless ``--ckpt`` names one.

    python benchmarks/bench_ray.py                       # 64 images, 96-160 px, --refine crf, batch 8
"""

from __future__ import annotations

import argparse
import filecmp
import os
import tempfile
import time
from pathlib import Path

import ray

from common import add_json_option, write_result
from wsss.data.datasets import VOCDataset
from wsss.data.synth import SynthConfig, generate_synth
from wsss.runtime.backends import open_backend
from wsss.runtime.cluster import BackendSource, ClusterConfig, label_on_ray, open_network
from wsss.runtime.labeler import LabelConfig, label_dataset
from wsss.train.configs import get_config
from wsss.train.loop import train

TINY = [
    'model.backbone.overrides={"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}',
    "model.backbone.img_size=48", "pretrained=null", "data.crop=48", "train.batch_size=4", "train.iters=2",
    "cam.input_size=48", "cam.scales=[1.0,0.5]",
]  # fmt: skip


def same_labels(a: Path, b: Path) -> float:
    """Fraction of label files of ``a`` that ``b`` holds byte for byte."""
    names = sorted(p.name for p in (a / "labels").glob("*.png"))
    return sum(filecmp.cmp(a / "labels" / n, b / "labels" / n, shallow=False) for n in names) / len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--min-size", type=int, default=96)
    parser.add_argument("--max-size", type=int, default=160)
    parser.add_argument("--refine", default="crf", choices=["none", "crf", "par"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="The local labeler's pools.")
    parser.add_argument("--replicas", type=int, default=1, help="Network actors on the Ray cluster.")
    parser.add_argument("--ckpt", type=Path, default=None)
    add_json_option(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_synth(tmp / "synth", SynthConfig(n_train=args.images, n_val=1, min_size=args.min_size,
                                                  max_size=args.max_size), progress=False)  # fmt: skip
        data = VOCDataset(tmp / "synth", "train")
        ckpt = args.ckpt or train(get_config("cam-tiny-synth", TINY), data, tmp / "run", progress=False)
        backend, spec, meta = open_backend(ckpt)
        cfg = LabelConfig(spec.cam, args.refine, batch=args.batch, workers=args.workers, quiet=True)
        load_before = os.getloadavg()
        local = label_dataset(backend, spec, meta, data, tmp / "local", cfg)

        tic = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        cluster_start_s = time.perf_counter() - tic
        tic = time.perf_counter()
        network = open_network(BackendSource(ckpt=ckpt))
        open_network_s = time.perf_counter() - tic
        on_ray = label_on_ray(network, data, tmp / "ray", cfg, ClusterConfig(replicas=args.replicas))
        agreement = same_labels(tmp / "local", tmp / "ray")
        ray.shutdown()

    rows = [{"pipeline": name, "images_per_s": s["images_per_s"], "elapsed_s": s["elapsed_s"], "ok": s["ok"],
             "timeline": s["timeline"]} for name, s in (("local labeler", local), ("ray", on_ray))]  # fmt: skip
    ratio = on_ray["images_per_s"] / local["images_per_s"]
    for row in rows:
        print(f"{row['pipeline']:14s} {row['images_per_s']:7.2f} img/s  {row['elapsed_s']:7.1f} s  "
              f"bound by {row['timeline']['bound_by']}")  # fmt: skip
    print(f"ray / local: {ratio:.2f}x; cluster start {cluster_start_s:.1f} s, open_network {open_network_s:.1f} s; "
          f"labels byte-identical: {agreement:.0%}")  # fmt: skip
    write_result("bench_ray_cpu", {
        "images": args.images, "image_px": [args.min_size, args.max_size], "refine": args.refine,
        "batch": args.batch, "local_workers": args.workers, "ray_replicas": args.replicas,
        "ray_cluster_cpus": os.cpu_count(), "rows": rows, "ray_over_local": round(ratio, 3),
        "cluster_start_s": round(cluster_start_s, 2), "open_network_s": round(open_network_s, 2),
        "labels_byte_identical": agreement, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "ray": ray.__version__, "note": "one run each on a machine shared with other jobs (see the load averages)",
    }, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
