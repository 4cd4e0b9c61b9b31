"""The batch labeler on a Ray cluster (``wsss label --ray``): its stages as one streaming Ray Data pipeline.

A row is one chunk of ``cfg.batch`` items of the shard, cut as the local labeler cuts them (``plan_run``), so
every forward sees the very batch a local run forms and the outputs are the same bytes. Stages, each the
labeler's own function: decoding (``SafeDataset``) as CPU tasks -> the network (``forward_chunk``: CAMs,
post-processing, PAR or the torch CRF on a GPU) in an actor pool fed through ``map_batches``, one replica per GPU
or a fixed number of CPU replicas -> host refinement (``_crf_in_worker``) and writing (``_finish``, temporary name
+ rename per file) as CPU tasks. Outputs are written where the tasks run (a folder every node sees); only each
chunk's journal records, a few hundred bytes, stream back to the driver.

Guarantees: the driver is the journal's only writer and adds a record once its chunk's files all exist, at most
one per item; Ray retries a task whose worker dies and restarts a dead actor, which redoes its chunk whole and
rewrites the same files under the same temporary names; after the driver dies, ``resume`` skips the finished
chunks as the local labeler does.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.datasets import WSSSDataset
from ..export.tensorrt import ProfileError
from ..models import ModelSpec
from .backends import open_backend
from .labeler import (
    STAGES,
    Failure,
    LabelConfig,
    SafeDataset,
    Times,
    _crf_in_worker,
    _crf_on_device,
    _finish,
    _probs,
    failed_record,
    forward_chunk,
    plan_run,
    record_run,
)

RAY_HINT = "labeling on a Ray cluster needs Ray Data: pip install 'wsss[ray]'"


def _ray():
    """The ``ray`` module with Ray Data, or a one-line error naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401 - the pipeline's engine
    except ImportError:
        raise RuntimeError(RAY_HINT) from None
    return ray


@dataclass(frozen=True)
class BackendSource:
    """Where each replica opens its network: ``open_backend``'s arguments, paths that every node can read."""

    ckpt: str | Path | None = None
    engine: str | Path | None = None
    backend: str | None = None  # as for open_backend: None picks by file
    device: str = "cpu"  # cpu, or cuda: each replica takes the GPU Ray gives it
    compile: bool = False
    vit_ckpt: str | Path | None = None
    what: str = "cam"  # the graph: cam, or seg for --source seg

    @property
    def on_gpu(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def open(self, precision: str):
        """(backend at ``precision``, spec, meta) in this process; on a GPU the first Ray assigned to it."""
        device = "cuda" if self.on_gpu else self.device
        backend, spec, meta = open_backend(self.ckpt, self.engine, self.backend, device, self.compile, self.vit_ckpt,
                                           self.what)  # fmt: skip
        return backend.at_precision(precision), spec, meta


@dataclass(frozen=True)
class ClusterConfig:
    """Which cluster and how many network replicas."""

    address: str | None = None  # None: RAY_ADDRESS if set, else a new local cluster
    replicas: int | None = None  # None: one per GPU of the cluster (GPU source), else 1
    gpus_per_replica: float = 1.0  # GPU source: 0.5 puts two replicas on each GPU
    cpus_per_replica: float = 1.0  # CPU source: also the replica's torch threads


@dataclass(frozen=True)
class Network:
    """What the driver knows of the replicas' network, read once on a replica's resources (``open_network``)."""

    source: BackendSource
    precision: str
    spec: ModelSpec
    meta: dict
    backend: str  # the backend's name, for the summary

    @property
    def what(self) -> str:  # what its graph gives (check_source)
        return self.source.what


def connect(cluster: ClusterConfig):
    """The ``ray`` module, connected to ``cluster.address`` (or RAY_ADDRESS, or a local cluster) unless it is."""
    ray = _ray()
    if not ray.is_initialized():  # warnings only: the labeler's bar and summary tell the rest
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    return ray


def _replica_resources(source: BackendSource, cluster: ClusterConfig) -> dict[str, float]:
    if source.on_gpu:
        return {"num_gpus": cluster.gpus_per_replica}
    return {"num_cpus": cluster.cpus_per_replica}


def _describe(source: BackendSource, precision: str) -> tuple[ModelSpec, dict, str]:
    backend, spec, meta = source.open(precision)
    return spec, meta, backend.name


def open_network(source: BackendSource, precision: str = "fp32", cluster: ClusterConfig = ClusterConfig()) -> Network:
    """Open the network once where a replica would run (so a missing GPU, file or precision is refused before any
    work, with the error the local labeler gives) and keep its spec and metadata."""
    ray = connect(cluster)
    source = replace(source, **{k: _absolute(getattr(source, k)) for k in ("ckpt", "engine", "vit_ckpt")})
    task = ray.remote(**_replica_resources(source, cluster))(_describe)
    try:
        spec, meta, name = ray.get(task.remote(source, precision))
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None
    return Network(source, precision, spec, meta, name)


def _absolute(path: str | Path | None) -> Path | None:
    """Paths as the driver sees them, for workers that start in other folders (or on nodes mounting the same)."""
    return None if path is None else Path(path).expanduser().resolve()


def _replica_count(ray, source: BackendSource, cluster: ClusterConfig) -> int:
    if cluster.replicas is not None:
        if cluster.replicas < 1:
            raise ValueError(f"replicas {cluster.replicas}: need at least 1")
        return cluster.replicas
    if not source.on_gpu:
        return 1
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus == 0:
        raise ValueError("--device cuda on Ray: the cluster has no GPU (ray status lists its resources)")
    return max(1, int(gpus / cluster.gpus_per_replica))


_CACHE: dict[str, object] = {}


def _shared(ref):
    """The object behind ``ref``, fetched once per worker process (the dataset is one object for every task)."""
    key = ref.hex()
    if key not in _CACHE:
        import ray

        _CACHE.clear()  # one run's dataset at a time
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def _decode_chunk(row: dict, data: list) -> list[dict]:
    """CPU task: one chunk's items decoded (a bad input becomes a ``Failure``) and their decoding seconds. A
    ``flat_map`` (one row out per row in): Ray Data fuses no stage that may change the row count into the batched
    actors after it, so decoding stays in tasks of its own."""
    safe = SafeDataset(_shared(data[0]), [int(i) for i in row["indices"]])
    items, seconds = zip(*(safe[i] for i in range(len(safe))), strict=True)
    busy = dict.fromkeys(STAGES, 0.0) | {"decode": sum(seconds)}
    return [{"chunk": row["chunk"], "payload": pickle.dumps((list(items), busy, {}))}]


class _Replica:
    """Actor: the network on its device; ``forward_chunk`` on one chunk per call."""

    def __init__(self, network: Network, cfg: LabelConfig, crf: str | None, overlay_ids: set[str], keep_images: bool):
        if not network.source.on_gpu:
            torch.set_num_threads(max(1, int(_assigned_cpus())))
        self.backend, _, _ = network.source.open(network.precision)
        self.spec, self.cfg, self.crf = network.spec, cfg, crf
        self.overlay_ids, self.keep_images = overlay_ids, keep_images  # images travel on only where needed

    def __call__(self, batch: dict) -> dict:
        return {"chunk": batch["chunk"], "payload": [self._forward(blob) for blob in batch["payload"]]}

    def _forward(self, blob: bytes) -> bytes:
        items, busy, main = pickle.loads(blob)
        samples = [x for x in items if not isinstance(x, Failure)]
        failures = [x for x in items if isinstance(x, Failure)]
        times = Times()
        samples, results, labels, overlays, failed = self._isolating(samples, times)
        failures += failed
        samples = [s if self.keep_images or o else replace(s, image=None, mask=None) for s, o in
                   zip(samples, overlays, strict=True)]  # fmt: skip
        busy = {k: busy[k] + times.busy[k] for k in STAGES}
        return pickle.dumps((failures, samples, results, labels, overlays, busy, {**main, **times.main}))

    def _isolating(self, samples: list, times: Times) -> tuple[list, list, list, list, list[Failure]]:
        """``forward_chunk`` on the chunk; where it raises, on each item alone, so that an item no network pass
        can take fails by itself with its reason, as in the local labeler (``_process_isolating``)."""
        if not samples:
            return [], [], [], [], []
        try:
            return samples, *forward_chunk(self.backend, self.spec, samples, self.cfg, self.crf, self.overlay_ids,
                                           times), []  # fmt: skip
        except ProfileError:
            raise
        except Exception as err:  # noqa: BLE001 - one bad item must not stop the job
            if len(samples) == 1:
                return [], [], [], [], [Failure(samples[0].id, failed_record(samples[0].id, err)["reason"])]
        parts = [self._isolating([s], times) for s in samples]
        return tuple([x for part in parts for x in part[i]] for i in range(5))


def _assigned_cpus() -> float:
    """CPUs Ray gave this actor."""
    import ray

    return ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)


def _refine_and_write(row: dict, out: str, cfg: LabelConfig, host_crf: str | None, names: tuple[str, ...]) -> dict:
    """CPU task: a chunk's host refinement (the dense CRF per image) and its files; returns its journal records
    and the busy seconds of every stage."""
    failures, samples, results, labels, overlays, busy, main = pickle.loads(row["payload"])
    records = [{"id": f.id, "status": "failed", "reason": f.reason} for f in failures]
    for sample, res, label, overlay in zip(samples, results, labels, overlays, strict=True):
        if host_crf is not None:
            try:
                label, seconds = _crf_in_worker(host_crf, sample.image, res.seed, res.tags.numpy(), _probs(res, cfg))
            except Exception as err:  # noqa: BLE001 - one item's refinement failed: that item alone
                records.append(failed_record(sample.id, err))
                continue
            busy["refine"] += seconds
        record, spent = _finish(Path(out), sample, label, res, cfg, names, overlay)
        records.append(record)
        busy["write"] += spent["write"]
    return {"chunk": row["chunk"], "records": json.dumps(records), "busy": json.dumps(busy), "main": json.dumps(main)}


def label_on_ray(network: Network, data: WSSSDataset, out: str | Path, cfg: LabelConfig,
                 cluster: ClusterConfig = ClusterConfig()) -> dict:  # fmt: skip
    """``label_dataset`` on a Ray cluster: the same inputs, settings, outputs, journal and summary (its timeline's
    lanes are the cluster's task CPUs and the replicas). ``out`` and the data must be readable by every node."""
    ray = connect(cluster)
    out = _absolute(out)
    device = "cuda" if network.source.on_gpu else network.source.device
    replicas = _replica_count(ray, network.source, cluster)
    plan = plan_run(data, network.spec, out, cfg, device)
    host_crf = None if plan.crf is None or _crf_on_device(plan.crf, device) else plan.crf
    times, tic = Times(), time.perf_counter()
    bar = tqdm(total=len(plan.indices), initial=plan.done_before, desc=f"label on ray ({replicas} replicas)",
               unit="img", disable=cfg.quiet, dynamic_ncols=True)  # fmt: skip
    try:
        if plan.todo:
            rows = _pipeline(ray, network, cluster, data, out, cfg, plan, replicas, host_crf)
            for row in rows:
                _journal_chunk(plan.journal, row, times)
                bar.update(len(json.loads(row["records"])))
    finally:
        bar.close()
        plan.journal.close()
    elapsed = time.perf_counter() - tic
    task_cpus = max(1, int(ray.cluster_resources().get("CPU", 1) - (0 if network.source.on_gpu else replicas)))
    lanes = {"decode": task_cpus, "forward": replicas, "refine": task_cpus if host_crf else replicas,
             "write": task_cpus}  # fmt: skip
    return record_run(plan, data, out, cfg, network.spec, network.meta, times, elapsed, lanes, f"ray:{device}",
                      network.backend)  # fmt: skip


def _pipeline(ray, network: Network, cluster: ClusterConfig, data, out: Path, cfg: LabelConfig, plan, replicas: int,
              host_crf: str | None):  # fmt: skip
    """The streaming rows of finished chunks, one each: its journal records and busy seconds."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # the labeler's own bar counts finished items
    if cfg.quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    chunks = [{"chunk": k, "indices": chunk} for k, chunk in enumerate(plan.todo)]
    write = {"out": str(out), "cfg": cfg, "host_crf": host_crf, "names": tuple(network.spec.class_names)}
    return (
        ray.data.from_items(chunks, override_num_blocks=len(chunks))
        .flat_map(_decode_chunk, fn_kwargs={"data": [ray.put(data)]})
        .map_batches(
            _Replica,
            batch_size=1,  # one row: a chunk, cfg.batch items per forward
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=replicas),
            fn_constructor_args=(network, cfg, plan.crf, plan.overlay_ids, host_crf is not None),
            **_replica_resources(network.source, cluster),
        )
        .map(_refine_and_write, fn_kwargs=write)
        .iter_rows()
    )


def _journal_chunk(journal, row: dict, times: Times) -> None:
    """A finished chunk's records into the journal, each item at most once (a chunk redone after a driver's
    death, or a result Ray delivers again, adds nothing), and its busy seconds into the run's."""
    for record in json.loads(row["records"]):
        if record["id"] not in journal.done:
            journal.add(record)
    for stage, seconds in json.loads(row["busy"]).items():
        times.busy[stage] += seconds
    for step, seconds in json.loads(row["main"]).items():
        times.main[step] += seconds
