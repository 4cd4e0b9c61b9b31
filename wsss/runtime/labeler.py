"""The batch pseudo-labeler: resumable, sharded, with overlapping stages.

Stages: decoding in a loader pool -> multi-scale + flip CAMs on the backend (``wsss.cam.pipeline.predict_cams``,
the one CAM post-processing path) -> refinement (PAR or the torch dense CRF batched on the device, or a dense CRF
per image in a process pool) -> writers in a thread pool. A chunk reaches the device in one copy per kind (images,
tags) and stays there through post-processing and device refinement; only what the host needs comes back, one copy
per dtype: the uint8 labels (and seeds where written, shown or CRF-refined on the host), the tags, and float16 CAMs
(optionally downscaled there) when they are saved. Each stage times its own work where it runs; ``summary.json``
reports it as a timeline of busy fractions (:func:`timeline`).
Outputs are written under temporary names and renamed; an item enters the journal
only after all its files exist. Work is cut into fixed chunks of ``batch`` items of the shard, and an unfinished
chunk is redone whole, so a resumed run computes every batch exactly as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import __version__
from ..cam.crf import INSTALL_HINT, refine_seed_crf
from ..cam.crf_torch import refine_seed_crf_batch
from ..cam.overlay import save_overlay
from ..cam.par import refine_labels
from ..cam.pipeline import CAMResult, cam_forward, predict_cams, to_device, to_host
from ..cam.seg import predict_segmentation, refine_segmentation
from ..data.datasets import Sample, WSSSDataset, check_classes
from ..data.palette import save_label_png
from ..export.tensorrt import ProfileError
from ..models import CAMSettings, ModelSpec
from .backends import select_device
from .rle import encode_label_map
from .workers import loader_options, worker_pool

JOURNAL = "journal"
CRF_IMPLS = ("auto", "torch", "pydensecrf")
STAGES = ("decode", "forward", "refine", "write")


@dataclass(frozen=True)
class LabelConfig:
    """How ``wsss label`` runs; see its ``--help``."""

    settings: CAMSettings = field(default_factory=CAMSettings)
    refine: str = "none"  # none | crf | par
    label_dir: str | None = "labels"  # refined labels (None: seeds only, refine must be "none")
    seed_dir: str | None = None  # also keep the unrefined seeds here
    batch: int = 16
    workers: int = 2
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    save_cams: bool = False
    format: str = "png"  # png | coco-rle
    overlays: int = 0
    quiet: bool = False
    precision: str = "fp32"  # the network's forward: fp32 | fp16 | bf16 (``backend.at_precision``)
    crf_impl: str = "auto"  # who runs refine="crf": auto | torch | pydensecrf (crf_implementation)
    cams_scale: float = 1.0  # save_cams: maps downscaled by this factor on the device (bilinear)
    source: str = "cam"  # cam: CAM seeds; seg: a decoder's §3.15 prediction (cams: its class probabilities)


@dataclass
class Times:
    """Where a run's time goes: the main loop's own seconds by step (``stages_s``) and each stage's busy seconds,
    timed where the stage runs (loader workers, the device, the CRF pool, the writer threads)."""

    main: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    busy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


def _device_mark(device) -> torch.cuda.Event | float:
    """A point on the device's timeline: a CUDA event on a GPU (read only after the chunk's copy to the host has
    waited for it, so it adds no synchronisation), the host clock elsewhere (the work is synchronous there)."""
    if torch.device(device).type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(first: torch.cuda.Event | float, last: torch.cuda.Event | float) -> float:
    return first.elapsed_time(last) / 1000 if isinstance(first, torch.cuda.Event) else last - first


@dataclass
class Failure:
    id: str
    reason: str


class SafeDataset(Dataset):
    """Decodes items of a dataset, each with the seconds it took; a bad input becomes a ``Failure``, not an
    exception."""

    def __init__(self, data: WSSSDataset, indices: list[int]):
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Sample | Failure, float]:
        index, tic = self.indices[i], time.perf_counter()
        try:
            item = self.data[index]
        except Exception as err:  # noqa: BLE001 - any bad input is recorded, never fatal
            item = Failure(self.data.ids[index], f"{type(err).__name__}: {err}")
        return item, time.perf_counter() - tic


def _as_list(items):
    return items


def crf_implementation(cfg: LabelConfig, device) -> str | None:
    """Who runs ``refine="crf"`` (both give the same labels, ``tests/test_label_stages.py``): ``auto`` is the torch
    lattice on a GPU, batched on the device; on a CPU pydensecrf, faster there, where it is installed, else torch."""
    if cfg.refine != "crf":
        return None
    if cfg.crf_impl not in CRF_IMPLS:
        raise ValueError(f"crf_impl {cfg.crf_impl!r}: expected one of {', '.join(CRF_IMPLS)}")
    installed = importlib.util.find_spec("pydensecrf") is not None
    if cfg.crf_impl == "pydensecrf" and not installed:
        raise RuntimeError(f"--crf-impl pydensecrf: {INSTALL_HINT}, or --crf-impl torch")
    if cfg.crf_impl != "auto":
        return cfg.crf_impl
    return "pydensecrf" if torch.device(device).type == "cpu" and installed else "torch"


def _crf_on_device(impl: str | None, device) -> bool:
    """The torch CRF runs batched on an accelerator; on a CPU it runs per image in the pool, beside the forward."""
    return impl == "torch" and torch.device(device).type != "cpu"


def shard_indices(n: int, shard: tuple[int, int]) -> list[int]:
    """Deterministic split: item ``i`` belongs to shard ``i mod N``."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= I < N")
    return list(range(index, n, count))


def shard_from_env() -> tuple[int, int] | None:
    """Under torchrun each rank takes its own shard."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


class Journal:
    """Append-only JSONL of finished items; a torn last line (a kill mid-write) is ignored."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            if not resume:
                raise FileExistsError(f"{path.parent.parent} holds a previous run: pass --resume, or a new --out")
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self.done[record["id"]] = record
                except (json.JSONDecodeError, KeyError):
                    continue
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        if self.file.tell() and not path.read_bytes().endswith(b"\n"):
            self.file.write("\n")  # end a torn last line so the next record starts clean

    def add(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done[record["id"]] = record

    def close(self) -> None:
        self.file.close()


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # ids of folder inputs may name subfolders (sub/name)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a temporary name
        np.savez_compressed(f, **arrays)


def write_item(out: Path, sample: Sample, label: np.ndarray, res: CAMResult, cfg: LabelConfig, class_names) -> dict:
    """All outputs of one item (temporary name + rename each); returns its journal record."""
    if cfg.seed_dir:
        _atomic(out / cfg.seed_dir / f"{sample.id}.png", lambda p: save_label_png(p, res.seed))
    if cfg.label_dir:
        _atomic(out / cfg.label_dir / f"{sample.id}.png", lambda p: save_label_png(p, label))
    if cfg.save_cams:  # res.cam: float16, downscaled by cfg.cams_scale (here, if it came for a host CRF)
        cams = res.cam if res.cam.dtype == torch.float16 else _saved_cams(res.cam, cfg.cams_scale)
        arrays = {"cams": cams.numpy(), "tags": res.tags.numpy(), "image_size": np.array(label.shape)}
        _atomic(out / "cams" / f"{sample.id}.npz", lambda p: _save_npz(p, **arrays))
    if cfg.format == "coco-rle":
        record = {"id": sample.id, "height": label.shape[0], "width": label.shape[1],
                  "segments": encode_label_map(label, class_names)}  # fmt: skip
        _atomic(out / "rle" / f"{sample.id}.json", lambda p: p.write_text(json.dumps(record)))
    classes = sorted(int(c) for c in np.unique(label) if 0 < c < 255)
    record = {"id": sample.id, "status": "ok", "classes": classes, "tags_given": sample.labels is not None}
    if getattr(res, "confidence", None) is not None:
        record["confidence"] = round(res.confidence, 4)
    return record


def _confidence(res: CAMResult) -> torch.Tensor:
    """The item's confidence, a float32 scalar on the device: the mean CAM score of each seed foreground pixel's
    class (normalised CAMs, so in [0, 1]); 0 where the seed has no foreground."""
    k = res.cam.shape[0]
    fg = (res.seed > 0) & (res.seed <= k)
    index = torch.where(fg, res.seed.long() - 1, 0)
    score = res.cam.float().gather(0, index[None])[0]
    return (score * fg).sum() / fg.sum().clamp(min=1)


def _refine_par(samples: list[Sample], results: list[CAMResult], settings: CAMSettings, device) -> list[torch.Tensor]:
    """uint8 PAR labels on the device at each image's resolution (§2.5 with the whole image as its box), one call
    per image size; the images reach the device in one copy."""
    images = to_device([s.image for s in samples], device)
    shapes = [s.image.shape for s in samples]
    labels: list[torch.Tensor | None] = [None] * len(samples)
    for shape in dict.fromkeys(shapes):
        group = [i for i, s in enumerate(shapes) if s == shape]
        image = torch.stack([images[i] for i in group]).permute(0, 3, 1, 2).float() / 255
        cams, tags = (torch.stack([getattr(results[i], k) for i in group]) for k in ("cam", "tags"))
        for i, lab in zip(group, refine_labels(image, cams, tags, settings.bkg_thresh), strict=True):
            labels[i] = lab.to(torch.uint8)
    return labels


def _refine_crf(samples: list[Sample], results: list[CAMResult], device, source: str = "cam") -> list[torch.Tensor]:
    """uint8 dense-CRF labels (§5.3 row C; row A on the probabilities of ``source="seg"``) of a chunk, batched on
    the device; the images reach it in one copy."""
    images = to_device([s.image for s in samples], device)
    if source == "seg":
        return refine_segmentation(images, [r.cam for r in results], "torch", device)
    tags = torch.stack([r.tags for r in results])
    return refine_seed_crf_batch(images, [r.seed for r in results], tags, "seed", device)


def _crf_in_worker(impl: str, image: np.ndarray, seed: np.ndarray, tags: np.ndarray,
                   probs: np.ndarray | None = None) -> tuple[np.ndarray, float]:  # fmt: skip
    """One image's dense CRF in a pool worker (row A on ``probs`` when given): the uint8 label and the seconds it
    took there."""
    tic = time.perf_counter()
    if probs is not None:
        torch.set_num_threads(1)
        label = np.asarray(refine_segmentation([image], [probs], impl)[0], np.uint8)
    elif impl == "pydensecrf":
        label = refine_seed_crf(image, seed, tags)
    else:
        torch.set_num_threads(1)  # a core per worker, as pydensecrf
        label = refine_seed_crf_batch([image], [seed], tags[None])[0].numpy()
    return label, time.perf_counter() - tic


def _saved_cams(cam: torch.Tensor, scale: float) -> torch.Tensor:
    """float16 CAMs to save, downscaled bilinearly on the device first when ``scale < 1``."""
    if scale != 1.0:
        size = [max(1, round(n * scale)) for n in cam.shape[-2:]]
        cam = F.interpolate(cam[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return cam.half()


def _fetch(results: list[CAMResult], refined: list[torch.Tensor] | None, cfg: LabelConfig,
           overlay: bool, probs: bool = False) -> tuple[list[CAMResult], list[np.ndarray]]:  # fmt: skip
    """Host results and labels of a chunk (PAR's, else the seeds), one copy per dtype: seeds only where written,
    shown or refined on the host, CAMs (float16) only when saved; ``probs``: the float32 maps (a host CRF's
    input)."""
    wanted = {"tags": [r.tags.to(torch.uint8) for r in results]}  # multi-hot: exact in uint8
    wanted["confidence"] = [_confidence(r) for r in results]
    if refined is not None:
        wanted["labels"] = refined
    if refined is None or cfg.seed_dir or overlay:
        wanted["seeds"] = [r.seed for r in results]
    if probs:
        wanted["cams"] = [r.cam.float() for r in results]
    elif cfg.save_cams:
        wanted["cams"] = [_saved_cams(r.cam, cfg.cams_scale) for r in results]
    n = len(results)
    flat = to_host([t for group in wanted.values() for t in group])
    host = {k: flat[i * n : (i + 1) * n] for i, k in enumerate(wanted)}
    none = [None] * n
    cams = [None if c is None else torch.from_numpy(c) for c in host.get("cams", none)]
    hosted = [CAMResult(c, torch.from_numpy(t.astype(np.float32)), s, float(q))
              for c, t, s, q in zip(cams, host["tags"], host.get("seeds", none), host["confidence"],
                                    strict=True)]  # fmt: skip
    return hosted, host.get("labels", host.get("seeds"))


def label_dataset(backend, spec: ModelSpec, meta: dict, data: WSSSDataset, out: str | Path, cfg: LabelConfig) -> dict:
    """Label every image of ``data`` in ``cfg.shard`` with the network ``spec`` describes; returns the shard
    summary (also written to ``out``). ``meta`` carries the checkpoint's / artifact's SHA-256 for the record.
    Refuses a dataset whose classes are not the network's (DatasetError)."""
    select_device(backend.device)  # Triton kernels and PAR launch on the backend's GPU
    backend = backend.at_precision(cfg.precision)
    check_source(backend, cfg)
    out = Path(out)
    plan, tag = plan_run(data, spec, out, cfg, backend.device), shard_tag(cfg.shard)
    journal, indices, todo, overlay_ids, crf = plan.journal, plan.indices, plan.todo, plan.overlay_ids, plan.crf
    times = Times()
    done_before = plan.done_before

    # Worker processes (decoding, CRF) die with this one and inherit none of its files (workers.py).
    loader = DataLoader(SafeDataset(data, [i for c in todo for i in c]), batch_size=None, collate_fn=_as_list,
                        **loader_options(cfg.workers, preload=[__name__]))  # fmt: skip
    batches = _rebatch(loader, [len(c) for c in todo])
    pooled = crf is not None and not _crf_on_device(crf, backend.device)
    crf_pool = worker_pool(max(cfg.workers, 1), preload=[__name__]) if pooled else None
    writers = ThreadPoolExecutor(max(cfg.workers, 1))
    pending: list[Future] = []
    bar = tqdm(total=len(indices), initial=done_before, desc=f"label {tag}", unit="img", disable=cfg.quiet,
               dynamic_ncols=True)  # fmt: skip
    t_start = time.perf_counter()
    try:
        while True:
            tic = time.perf_counter()
            items, decode_s = next(batches, (None, 0.0))
            times.main["decode_wait_s"] += time.perf_counter() - tic
            times.busy["decode"] += decode_s
            if items is None:
                break
            for failure in (x for x in items if isinstance(x, Failure)):
                journal.add({"id": failure.id, "status": "failed", "reason": failure.reason})
            samples = [x for x in items if isinstance(x, Sample)]
            current = _process_isolating(journal, backend, spec, samples, out, cfg, crf, crf_pool, writers,
                                         overlay_ids, times)  # fmt: skip
            _drain(pending, journal, times)  # the previous chunk finishes while this one refines and writes
            pending = current
            bar.update(len(items))
        _drain(pending, journal, times)
    finally:
        bar.close()
        writers.shutdown(wait=True)
        if crf_pool is not None:
            crf_pool.shutdown(cancel_futures=True)
        journal.close()
    elapsed = time.perf_counter() - t_start
    lanes = {"decode": max(cfg.workers, 1), "forward": 1, "refine": max(cfg.workers, 1) if pooled else 1,
             "write": max(cfg.workers, 1)}  # fmt: skip
    return record_run(plan, data, out, cfg, spec, meta, times, elapsed, lanes, str(backend.device), backend.name)


@dataclass
class Plan:
    """A run's work: the shard's items in chunk order, the chunks not finished yet, the journal of those done."""

    journal: Journal
    indices: list[int]
    todo: list[list[int]]
    overlay_ids: set[str]
    crf: str | None

    @property
    def done_before(self) -> int:
        return len(self.indices) - sum(map(len, self.todo))  # items of finished chunks


def plan_run(data: WSSSDataset, spec: ModelSpec, out: Path, cfg: LabelConfig, device) -> Plan:
    """Check the inputs, make the output folders, open the shard's journal and cut the shard into chunks of
    ``cfg.batch`` items (a resumed run redoes an unfinished chunk whole, so every batch is the same as before)."""
    check_classes(data, spec.class_names)
    if cfg.label_dir is None and cfg.refine != "none":
        raise ValueError("refined labels need a label_dir")
    optional = {"cams": cfg.save_cams, "rle": cfg.format == "coco-rle", cfg.seed_dir: bool(cfg.seed_dir),
                cfg.label_dir: bool(cfg.label_dir)}  # fmt: skip
    for sub in [JOURNAL] + [name for name, wanted in optional.items() if wanted]:
        (out / sub).mkdir(parents=True, exist_ok=True)
    journal = Journal(out / JOURNAL / f"{shard_tag(cfg.shard)}.jsonl", cfg.resume)
    indices = shard_indices(len(data), cfg.shard)
    if cfg.settings.input_size is None:  # native resolution: neighbours in a chunk share a padded shape
        indices.sort(key=lambda i: _header_size(data.image_path(i)))
    chunks = [indices[i : i + cfg.batch] for i in range(0, len(indices), cfg.batch)]
    todo = [c for c in chunks if any(data.ids[i] not in journal.done for i in c)]
    overlay_ids = {data.ids[i] for i in indices[: cfg.overlays]}
    if overlay_ids:
        (out / "overlays").mkdir(exist_ok=True)
    crf = crf_implementation(cfg, device)
    if not 0 < cfg.cams_scale <= 1:
        raise ValueError(f"cams_scale {cfg.cams_scale}: need 0 < S <= 1 (1 keeps the image's resolution)")
    return Plan(journal, indices, todo, overlay_ids, crf)


def shard_tag(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}"


def record_run(plan: Plan, data, out: Path, cfg: LabelConfig, spec, meta, times: Times, elapsed: float,
               lanes: dict[str, int], device: str, backend_name: str) -> dict:  # fmt: skip
    """Write the shard's summary (merged into ``summary.json`` when the run is unsharded) and return it."""
    summary = _summary(plan.journal, data, plan.indices, cfg, spec, meta, times.main, elapsed, plan.done_before)
    summary["timeline"] = timeline(times.busy, lanes, elapsed)
    summary["device"], summary["backend"], summary["crf_impl"] = device, backend_name, plan.crf
    (out / f"summary-{shard_tag(cfg.shard)}.json").write_text(json.dumps(summary, indent=2))
    if cfg.shard[1] == 1:
        merge_shards(out)
    return summary


def check_source(backend, cfg: LabelConfig) -> None:
    """The backend's graph must produce what ``cfg.source`` reads (a seg graph: ``(seg,)`` logits)."""
    what = getattr(backend, "what", "cam")
    if cfg.source not in ("cam", "seg"):
        raise ValueError(f"source must be 'cam' or 'seg', got {cfg.source!r}")
    if what != cfg.source:
        fix = "wsss export --what seg" if cfg.source == "seg" else "--source seg"
        raise ValueError(f"source {cfg.source!r} needs a {cfg.source} network output, this backend gives {what} "
                         f"outputs: use {fix}")  # fmt: skip
    if cfg.source == "seg" and cfg.refine == "par":
        raise ValueError("PAR refines CAMs; segmentation predictions take refine 'crf' (§3.15) or 'none'")
    if cfg.source == "cam":
        cam_forward(backend, cfg.settings.layers)  # LayerCAM needs a backend with gradients


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header without decoding; (0, 0) for unreadable files."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - bad files are reported when decoded
        return (0, 0)


def _drain(futures: list[Future], journal: Journal, times: Times) -> None:
    tic = time.perf_counter()
    for future in futures:
        record, busy = future.result()
        journal.add(record)
        for stage, seconds in busy.items():
            times.busy[stage] += seconds
    times.main["write_wait_s"] += time.perf_counter() - tic


def _rebatch(loader, sizes: list[int]):
    """Regroup the loader's (item, decode seconds) stream into the fixed chunks: (items, their decode seconds)."""
    stream = iter(loader)
    for size in sizes:
        items, seconds = zip(*(next(stream) for _ in range(size)), strict=True)
        yield list(items), sum(seconds)


def _process(backend, spec, samples, out, cfg, crf, crf_pool, writers, overlay_ids, times: Times) -> list[Future]:
    """Forward + post-process one chunk on the device (and refine it there: PAR, the torch CRF on a GPU), bring back
    what the host needs, then hand pooled CRF refinement and writing to the pools."""
    if not samples:
        return []
    results, labels, overlays = forward_chunk(backend, spec, samples, cfg, crf, overlay_ids, times)
    tic = time.perf_counter()
    if crf_pool is not None:
        labels = [crf_pool.submit(_crf_in_worker, crf, s.image, r.seed, r.tags.numpy(), _probs(r, cfg)) for s, r in
                  zip(samples, results, strict=True)]  # fmt: skip
    times.main["refine_submit_s"] += time.perf_counter() - tic
    names = spec.class_names
    return [writers.submit(_finish, out, sample, label, res, cfg, names, overlay)
            for sample, res, label, overlay in zip(samples, results, labels, overlays, strict=True)]  # fmt: skip


def _probs(res: CAMResult, cfg: LabelConfig) -> np.ndarray | None:
    """What a host CRF refines besides the seed: a segmentation prediction's class probabilities (§3.15)."""
    return res.cam.numpy() if cfg.source == "seg" else None


def forward_chunk(backend, spec, samples: list[Sample], cfg: LabelConfig, crf: str | None, overlay_ids: set[str],
                  times: Times) -> tuple[list[CAMResult], list[np.ndarray] | None, list[bool]]:  # fmt: skip
    """The device's part of a chunk: forward + post-processing (and PAR or the torch CRF on a GPU), then what the
    host needs fetched in one copy per dtype; returns the host results, the labels (the seeds where refinement is
    left to the host) and which items get overlays."""
    start = time.perf_counter()
    predict = predict_segmentation if cfg.source == "seg" else predict_cams
    results = predict(backend, [s.image for s in samples], [s.labels for s in samples], cfg.settings,
                      backend.device, spec.mean, spec.std, on_device=True)  # fmt: skip
    launched, refine_start = time.perf_counter(), _device_mark(backend.device)
    refined = None
    if cfg.refine == "par":
        refined = _refine_par(samples, results, cfg.settings, backend.device)
    elif _crf_on_device(crf, backend.device):
        refined = _refine_crf(samples, results, backend.device, cfg.source)
    refine_end = _device_mark(backend.device)
    overlays = [s.id in overlay_ids for s in samples]
    host_probs = cfg.source == "seg" and crf is not None and not _crf_on_device(crf, backend.device)
    results, labels = _fetch(results, refined, cfg, any(overlays), host_probs)
    fetched = time.perf_counter()  # the device's work so far is waited for here
    times.main["cam_s"] += launched - start
    times.main["fetch_s"] += fetched - launched
    refine_s = _seconds(refine_start, refine_end)
    times.busy["refine"] += refine_s
    times.busy["forward"] += fetched - start - refine_s
    return results, labels, overlays


def _process_isolating(journal: Journal, backend, spec, samples, *rest) -> list[Future]:
    """:func:`_process` a chunk; where it raises, each of its items alone, so that an item no network pass can
    take (a 1-pixel side at native size, say) fails by itself, recorded with its reason, and the others are
    labelled. An image outside a TensorRT profile stays fatal: every image of that size would fail the same way."""
    try:
        return _process(backend, spec, samples, *rest)
    except ProfileError:
        raise
    except Exception as err:  # noqa: BLE001 - one bad item must not stop the job
        if len(samples) == 1:
            journal.add(failed_record(samples[0].id, err))
            return []
    return [f for s in samples for f in _process_isolating(journal, backend, spec, [s], *rest)]


def _finish(out, sample, label, res, cfg, names, overlay: bool) -> tuple[dict, dict[str, float]]:
    """Write one item (after its pooled CRF, if any); its journal record and the busy seconds of the CRF (in its
    worker) and of the writing (in this thread)."""
    busy = {}
    if isinstance(label, Future):
        try:
            label, busy["refine"] = label.result()
        except BrokenProcessPool:  # the pool itself is gone: stop (--resume redoes what is left)
            raise
        except Exception as err:  # noqa: BLE001 - one item's refinement failed: that item alone
            return failed_record(sample.id, err), busy
    tic = time.perf_counter()
    record = write_item(out, sample, label, res, cfg, names)
    if overlay:
        save_overlay(out / "overlays" / f"{sample.id}.png", sample, res.seed, label if cfg.refine != "none" else None,
                     names)  # fmt: skip
    busy["write"] = time.perf_counter() - tic
    return record, busy


def failed_record(item_id: str, err: Exception) -> dict:
    """The journal record of an item that failed, with its reason."""
    return {"id": item_id, "status": "failed", "reason": f"{type(err).__name__}: {err}"}


def timeline(busy: dict[str, float], lanes: dict[str, int], elapsed: float) -> dict:
    """Per stage its busy seconds, where they ran in parallel (``lanes``: pool workers, 1 for the device) and the
    busy fraction ``busy / (lanes * wall)``; ``bound_by`` names the busiest stage, the one that bounds the run."""
    stages = {s: {"busy_s": round(busy[s], 3), "lanes": lanes[s],
                  "busy_fraction": round(busy[s] / (lanes[s] * elapsed), 3) if elapsed > 0 else 0.0}
              for s in STAGES}  # fmt: skip
    return {**stages, "bound_by": max(STAGES, key=lambda s: stages[s]["busy_fraction"])}


def _summary(journal: Journal, data, indices, cfg: LabelConfig, spec, meta, timing, elapsed, done_before) -> dict:
    records = [journal.done[data.ids[i]] for i in indices if data.ids[i] in journal.done]
    failed = [{"id": r["id"], "reason": r["reason"]} for r in records if r["status"] == "failed"]
    processed = len(indices) - done_before
    return {
        "shard": list(cfg.shard), "images": len(indices), "ok": len(records) - len(failed), "failed": len(failed),
        "failures": failed, **_skipped(data), "processed_this_run": processed, "elapsed_s": round(elapsed, 3),
        "images_per_s": round(processed / elapsed, 3) if elapsed > 0 else None,
        "stages_s": {k: round(v, 3) for k, v in timing.items()},
        "classes_given_by_tags": sum(r.get("tags_given", False) for r in records),
        "config": {**asdict(cfg), "settings": {**asdict(cfg.settings), "scales": list(cfg.settings.scales)}},
        "checkpoint_sha256": meta.get("source_sha256", ""), "artifact_sha256": meta.get("artifact_sha256", ""),
        "method": spec.family, "class_names": list(spec.class_names), "package_version": __version__,
    }  # fmt: skip


def _skipped(data) -> dict:
    """The entries of the input a reader found but could not read as images (``FolderDataset.skipped``), with
    their reasons; every shard lists them all (merged by entry)."""
    entries = [{"entry": entry, "reason": reason} for entry, reason in getattr(data, "skipped", [])]
    return {"skipped": len(entries), "skips": entries}


def merge_shards(out: str | Path) -> dict:
    """Combine ``summary-shard-*.json`` (and per-image RLE files) into ``summary.json`` (+ ``pseudo_labels.json``)."""
    out = Path(out)
    shards = [json.loads(p.read_text()) for p in sorted(out.glob("summary-shard-*.json"))]
    if not shards:
        raise FileNotFoundError(f"{out}: no summary-shard-*.json to merge")
    counts = {tuple(s["shard"]) for s in shards}
    total = shards[0]["shard"][1]
    missing = sorted(set(range(total)) - {i for i, _ in counts})
    merged = {
        "shards": len(shards), "missing_shards": missing,
        **{k: sum(s[k] for s in shards) for k in ("images", "ok", "failed")},
        "failures": [f for s in shards for f in s["failures"]],
        **_merged_skips(shards),
        "stages_s": dict(sum((Counter(s["stages_s"]) for s in shards), Counter())),
        **{k: shards[0][k] for k in ("config", "checkpoint_sha256", "artifact_sha256", "method", "class_names",
                                     "package_version")},
        "crf_impl": shards[0].get("crf_impl"), "timeline": _merged_timeline(shards),
    }  # fmt: skip
    merged["config"]["shard"] = None
    if (out / "rle").is_dir():
        _merge_rle(out, merged["class_names"])
    (out / "summary.json").write_text(json.dumps(merged, indent=2))
    return merged


def _merged_skips(shards: list[dict]) -> dict:
    skips = {s["entry"]: s for shard in shards for s in shard.get("skips", [])}
    return {"skipped": len(skips), "skips": [skips[k] for k in sorted(skips)]}


def _merged_timeline(shards: list[dict]) -> dict | None:
    """The shards' timelines as one: busy seconds summed over the sum of their wall times (None: a shard of a version
    without timelines)."""
    if not all("timeline" in s for s in shards):
        return None
    busy = {st: sum(s["timeline"][st]["busy_s"] for s in shards) for st in STAGES}
    lanes = {st: shards[0]["timeline"][st]["lanes"] for st in STAGES}
    return timeline(busy, lanes, sum(s["elapsed_s"] for s in shards))


def _merge_rle(out: Path, class_names) -> None:
    records = [json.loads(p.read_text()) for p in sorted((out / "rle").rglob("*.json"))]  # ids may hold "/"
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": rec["id"], "height": rec["height"], "width": rec["width"]})
        for seg in rec["segments"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **seg})
    categories = [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    _atomic(out / "pseudo_labels_coco.json", lambda p: p.write_text(json.dumps(coco)))
