"""The labeler on a local Ray cluster (2 CPUs): the local labeler's bytes, killed actors, tasks and drivers."""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsss.cli import cli
from wsss.data.datasets import FolderDataset
from wsss.runtime.backends import open_backend
from wsss.runtime.labeler import LabelConfig, label_dataset

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'wsss[ray]'")

from wsss.runtime.cluster import BackendSource, label_on_ray, open_network  # noqa: E402

ACTOR_TITLE = "ray::MapWorker(MapBatches(_Replica))"  # Ray's process title of the network's actors
WRITE_TITLE = "ray::Map(_refine_and_write)"  # ... and of a worker running a refine-and-write task
DECODE_TITLE = "ray::FlatMap(_decode_chunk)"  # ... or a decoding task


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: its address, for drivers in other processes."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def network(cluster, tiny_ckpt):
    return open_network(BackendSource(ckpt=tiny_ckpt))


@pytest.fixture(scope="module")
def folder(synth, tmp_path_factory):
    """12 images (copies of the synthetic ones) and their tags."""
    root = tmp_path_factory.mktemp("ray_images")
    (root / "images").mkdir()
    tags, rows = json.loads((synth / "cls_labels.json").read_text()), ["image,labels"]
    sources = sorted((synth / "JPEGImages").glob("*.jpg"))
    for i in range(12):
        src = sources[i % len(sources)]
        shutil.copy(src, root / "images" / f"img{i:02d}.jpg")
        rows.append(f"img{i:02d}.jpg,{';'.join(tags[src.stem])}")
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    return f"folder:{root / 'images'}:{root / 'tags.csv'}"


@contextlib.contextmanager
def _torch_threads(n: int):
    """The local run with the replica's threads (one CPU each): float summation order, hence the bytes, match."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _local(tiny_ckpt, data, out: Path, cfg: LabelConfig) -> Path:
    backend, spec, meta = open_backend(tiny_ckpt)
    with _torch_threads(1):
        label_dataset(backend, spec, meta, data, out, cfg)
    return out


@pytest.fixture(scope="module")
def local_folder_run(tiny_ckpt, folder, network, tmp_path_factory):
    cfg = LabelConfig(network.spec.cam, "crf", batch=2, quiet=True, format="coco-rle")
    return _local(tiny_ckpt, _data(folder, network), tmp_path_factory.mktemp("local") / "out", cfg)


def _data(spec: str, network) -> FolderDataset:
    _, images, tags = spec.split(":")
    return FolderDataset(images, tags, network.spec.class_names)


def _same_files(a: Path, b: Path, sub: str) -> None:
    names = sorted(p.name for p in (a / sub).iterdir())
    assert names and names == sorted(p.name for p in (b / sub).iterdir())
    assert all(filecmp.cmp(a / sub / n, b / sub / n, shallow=False) for n in names), f"{sub} differ"


def _journal_ids(out: Path) -> list[str]:
    lines = (out / "journal" / "shard-0-of-1.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines if line.endswith("}")]


def _check_done_once(out: Path, local: Path, n: int) -> None:
    """Every item done, each once in the journal, and the outputs the local labeler's bytes."""
    ids = _journal_ids(out)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == n, "each item needs exactly one journal record"
    _same_files(local, out, "labels")
    assert filecmp.cmp(local / "pseudo_labels_coco.json", out / "pseudo_labels_coco.json", shallow=False)
    assert not list(out.rglob(".*.tmp"))
    assert json.loads((out / "summary.json").read_text())["ok"] == n


def test_ray_outputs_are_the_local_labelers_bytes(cluster, network, tiny_ckpt, synth, tmp_path):
    """`wsss label --ray ADDRESS` and the local labeler, same settings: the same files, the same journal."""
    cfg = LabelConfig(network.spec.cam, "crf", batch=4, quiet=True, save_cams=True, format="coco-rle")
    local = _local(tiny_ckpt, _voc_val(synth), tmp_path / "local", cfg)
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", tmp_path / "ray", "--refine", "crf",
            "--batch", 4, "--save-cams", "--format", "coco-rle", "--quiet", "--ray", cluster]  # fmt: skip
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "ray"
    for sub in ("labels", "rle"):
        _same_files(local, out, sub)
    for path in sorted((local / "cams").glob("*.npz")):  # the archive records its write time: compare the arrays
        a, b = np.load(path), np.load(out / "cams" / path.name)
        assert all(np.array_equal(a[k], b[k]) for k in ("cams", "tags", "image_size"))
    assert filecmp.cmp(local / "pseudo_labels_coco.json", out / "pseudo_labels_coco.json", shallow=False)
    records = lambda o: sorted((o / "journal" / "shard-0-of-1.jsonl").read_text().splitlines())  # noqa: E731
    assert records(out) == records(local) and len(records(out)) == 6
    summary = json.loads((out / "summary-shard-0-of-1.json").read_text())
    assert summary["ok"] == 6 and summary["device"] == "ray:cpu" and summary["crf_impl"] == "pydensecrf"
    assert summary["timeline"]["forward"]["lanes"] == 1 and summary["timeline"]["forward"]["busy_s"] > 0


def _voc_val(synth):
    from wsss.data.datasets import VOCDataset

    return VOCDataset(synth, "val")


def _processes_titled(*titles: str) -> list[int]:
    """Pids of the processes below this one (the test's cluster) whose title, which Ray sets to the task or actor it
    runs, starts with one of ``titles``."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    below, frontier = [], [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        below += children
        frontier += children
    found = []
    for pid in below:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(tuple(t.encode() for t in titles)):
                found.append(pid)
    return found


def _kill_when(journal: Path, after: int, titles: tuple[str, ...], killed: list[int], deadline: float) -> None:
    """SIGKILL the first process titled one of ``titles`` once ``journal`` holds ``after`` records (mid-run)."""
    while time.time() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= after:
            for pid in _processes_titled(*titles):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
        time.sleep(0.002)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray's workers by title in /proc")
def test_killed_actor_and_write_task_end_with_every_item_done_once(network, folder, local_folder_run, tmp_path):
    """A worker in a decoding or refine-and-write task, then the network's actor, SIGKILLed mid-run: Ray retries the
    task and restarts the actor; every item is done, once, with the local labeler's bytes."""
    out = tmp_path / "out"
    journal, deadline = out / "journal" / "shard-0-of-1.jsonl", time.time() + 240
    killed_task, killed_actor = [], []

    def kill_both() -> None:
        _kill_when(journal, 2, (WRITE_TITLE, DECODE_TITLE), killed_task, deadline)
        _kill_when(journal, 2, (ACTOR_TITLE,), killed_actor, deadline)

    killer = threading.Thread(target=kill_both, daemon=True)
    killer.start()
    cfg = LabelConfig(network.spec.cam, "crf", batch=2, quiet=True, format="coco-rle")
    label_on_ray(network, _data(folder, network), out, cfg)
    killer.join(timeout=5)
    assert killed_task and killed_actor, "the run must lose a task and an actor part-way for this test to mean much"
    _check_done_once(out, local_folder_run, 12)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="kills the driver process")
def test_resume_after_the_driver_is_killed(cluster, network, folder, local_folder_run, tmp_path):
    out = tmp_path / "out"
    journal = out / "journal" / "shard-0-of-1.jsonl"
    cmd = [sys.executable, "-m", "wsss.cli", "label", "--ckpt", str(network.source.ckpt), "--data", folder,
           "--out", str(out), "--refine", "crf", "--batch", "2", "--format", "coco-rle", "--quiet",
           "--ray", cluster]  # fmt: skip
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 2):
            assert driver.poll() is None, f"the driver exited ({driver.returncode}): {driver.stderr.read()[-2000:]}"
            time.sleep(0.01)
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done = len(journal.read_text().splitlines())
    assert 2 <= done < 12, "the driver must die part-way for this test to mean anything"
    deadline = time.time() + 60  # Ray stops the dead driver's actor and tasks with its job
    while _processes_titled(ACTOR_TITLE, WRITE_TITLE, DECODE_TITLE) and time.time() < deadline:
        time.sleep(0.1)
    assert not _processes_titled(ACTOR_TITLE), "the killed driver's network actor outlived it"
    cfg = LabelConfig(network.spec.cam, "crf", batch=2, quiet=True, format="coco-rle", resume=True)
    summary = label_on_ray(network, _data(folder, network), out, cfg)
    assert summary["processed_this_run"] <= 12 - (done // 2) * 2  # finished chunks are skipped
    _check_done_once(out, local_folder_run, 12)


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch, tiny_ckpt, synth, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", tmp_path / "o", "--ray"]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == (
        "Error: labeling on a Ray cluster needs Ray Data: pip install 'wsss[ray]'")  # fmt: skip
    assert not (tmp_path / "o").exists()
    alone = CliRunner().invoke(cli, list(map(str, [*args[:-1], "--replicas", 2])))
    assert alone.exit_code == 2 and "--replicas: only with --ray" in alone.output
