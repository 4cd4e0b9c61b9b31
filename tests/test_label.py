"""The batch labeler: backends agree, kill-and-resume, shards + merge, bad inputs, tags vs predictions."""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from wsss.cli import cli
from wsss.data.palette import read_label_png


def _label(*args) -> str:
    result = CliRunner().invoke(cli, ["label", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: read_label_png(p) for p in sorted(folder.glob("*.png"))}


def test_label_equals_cam_seeds(synth, tiny_ckpt, tmp_path):
    """One CAM post-processing path: `wsss label --refine none` writes exactly `wsss cam`'s seeds."""
    CliRunner().invoke(cli, ["cam", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", tmp_path / "cam"])
    _label("--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", tmp_path / "lab", "--refine", "none",
           "--quiet")  # fmt: skip
    seeds, labels = _pngs(tmp_path / "cam" / "seeds"), _pngs(tmp_path / "lab" / "labels")
    assert seeds.keys() == labels.keys() and len(seeds) == 6
    assert all(np.array_equal(seeds[k], labels[k]) for k in seeds)


def test_keep_seeds_writes_the_unrefined_seeds_beside_the_labels(synth, tiny_ckpt, tmp_path):
    _label("--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", tmp_path / "seeds", "--refine", "none",
           "--quiet")  # fmt: skip
    _label("--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", tmp_path / "both", "--keep-seeds", "--quiet")
    seeds, kept = _pngs(tmp_path / "seeds" / "labels"), _pngs(tmp_path / "both" / "seeds")
    labels = _pngs(tmp_path / "both" / "labels")
    assert seeds.keys() == kept.keys() == labels.keys() and len(kept) == 6
    assert all(np.array_equal(seeds[k], kept[k]) for k in seeds)
    assert any(not np.array_equal(kept[k], labels[k]) for k in kept)  # the labels are the CRF's
    result = CliRunner().invoke(cli, ["label", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out",
                                      tmp_path / "none", "--refine", "none", "--keep-seeds"])  # fmt: skip
    assert result.exit_code == 2 and "without --refine crf|par the labels are the seeds" in result.output
    assert not (tmp_path / "none").exists()


def test_torch_and_onnx_backends_agree(synth, tiny_ckpt, tmp_path):
    onnx_path = tmp_path / "cam.onnx"
    result = CliRunner().invoke(cli, ["export", "--ckpt", tiny_ckpt, "--onnx", onnx_path])
    assert result.exit_code == 0, result.output
    for name, source in (("torch", ["--ckpt", tiny_ckpt]), ("onnx", ["--engine", onnx_path])):
        _label(*source, "--data", f"voc:{synth}:val", "--out", tmp_path / name, "--refine", "par", "--save-cams",
               "--quiet")  # fmt: skip
    a, b = _pngs(tmp_path / "torch" / "labels"), _pngs(tmp_path / "onnx" / "labels")
    agreement = np.mean([np.mean(a[k] == b[k]) for k in a])
    assert agreement >= 0.999  # stated tolerance: arg-max ties may flip on float noise
    for k in a:
        cam_a = np.load(tmp_path / "torch" / "cams" / f"{k}.npz")["cams"].astype(np.float32)
        cam_b = np.load(tmp_path / "onnx" / "cams" / f"{k}.npz")["cams"].astype(np.float32)
        np.testing.assert_allclose(cam_a, cam_b, atol=2e-3)  # float16 storage
    summary = json.loads((tmp_path / "onnx" / "summary.json").read_text())
    assert summary["artifact_sha256"] and summary["ok"] == 6


@pytest.fixture()
def many_images(synth, tmp_path):
    """A folder of 40 images (copies of the synthetic ones) with a tags CSV."""
    folder = tmp_path / "images"
    folder.mkdir()
    classes = (synth / "classes.txt").read_text().split()
    tags = json.loads((synth / "cls_labels.json").read_text())
    rows = ["image,labels"]
    sources = sorted((synth / "JPEGImages").glob("*.jpg"))
    for i in range(40):
        src = sources[i % len(sources)]
        shutil.copy(src, folder / f"img{i:03d}.jpg")
        rows.append(f"img{i:03d}.jpg,{';'.join(tags[src.stem])}")
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    return folder, tmp_path / "tags.csv", classes


def _procs() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process, read from /proc."""
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        procs[int(stat.parent.name)] = (int(fields[1]), fields[0], fields[19])
    return procs


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process below ``root``."""
    procs, found, frontier = _procs(), {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, start) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def _alive(tree: dict[int, str]) -> list[int]:
    procs = _procs()  # a zombie is dead; a pid with another start time is another process
    return [pid for pid, start in tree.items() if pid in procs and procs[pid][2] == start and procs[pid][1] != "Z"]


def _open_files(pid: int) -> set[str]:
    try:
        return {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:  # exited meanwhile
        return set()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_sigkill_and_resume_equals_uninterrupted(tiny_ckpt, many_images, tmp_path):
    """A SIGKILLed labeler leaves no worker behind, and resuming it gives the uninterrupted result."""
    folder, tags, _ = many_images
    spec = f"folder:{folder}:{tags}"
    base = ["--ckpt", tiny_ckpt, "--data", spec, "--refine", "crf", "--batch", "2", "--workers", "2", "--quiet",
            "--format", "coco-rle"]  # fmt: skip
    _label(*base, "--out", tmp_path / "full")

    out = tmp_path / "killed"
    journal = out / "journal" / "shard-0-of-1.jsonl"
    cmd = [sys.executable, "-m", "wsss.cli", "label", *map(str, base), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 6):
            assert proc.poll() is None, f"the labeler exited ({proc.returncode}) before it was killed"
            time.sleep(0.02)
        tree = _descendants(proc.pid)  # decoding and CRF workers (and whatever starts them) are up by now
        assert len(tree) >= 4, f"expected 2 decoding + 2 CRF workers below the labeler, found {len(tree)} processes"
        holders = [pid for pid in tree if str(journal.resolve()) in _open_files(pid)]
        assert not holders, f"workers {holders} hold the journal open"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(tree), f"processes {_alive(tree)} of the killed labeler still run"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever a failure above left behind
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(journal.read_text().splitlines())
    assert 6 <= done < 40, "the job must be killed part-way for this test to mean anything"
    with journal.open("a") as f:
        f.write('{"id": "img039", "sta')  # a torn last line, as a kill during a write leaves it

    _label(*base, "--out", out, "--resume")
    full, resumed = _pngs(tmp_path / "full" / "labels"), _pngs(out / "labels")
    assert full.keys() == resumed.keys() and len(full) == 40
    assert all(np.array_equal(full[k], resumed[k]) for k in full)
    assert filecmp.cmp(tmp_path / "full" / "pseudo_labels_coco.json", out / "pseudo_labels_coco.json", shallow=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 40 and summary["failed"] == 0
    assert not list(out.rglob(".*.tmp"))  # no half-written file survives as an output
    lines = journal.read_text().splitlines()
    assert '{"id": "img039", "sta' in lines  # the torn line stays alone on its line
    ids = [json.loads(line)["id"] for line in lines if line.endswith("}")]
    assert set(ids) == set(full)


def test_resume_required_to_reuse_an_output_folder(tiny_ckpt, synth, tmp_path):
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", tmp_path, "--quiet"]
    assert CliRunner().invoke(cli, list(map(str, args))).exit_code == 0
    again = CliRunner().invoke(cli, list(map(str, args)))
    assert again.exit_code == 1 and "--resume" in again.output


def test_shards_merge_to_the_unsharded_run(tiny_ckpt, many_images, tmp_path):
    folder, tags, _ = many_images
    base = ["--ckpt", tiny_ckpt, "--data", f"folder:{folder}:{tags}", "--refine", "none", "--quiet"]
    _label(*base, "--out", tmp_path / "one")
    for i in range(3):
        _label(*base, "--out", tmp_path / "many", "--shard", f"{i}/3")
    assert "3 shards: 40 labelled, 0 failed" in _label("merge", tmp_path / "many")
    one, many = _pngs(tmp_path / "one" / "labels"), _pngs(tmp_path / "many" / "labels")
    assert one.keys() == many.keys() and all(np.array_equal(one[k], many[k]) for k in one)
    merged = json.loads((tmp_path / "many" / "summary.json").read_text())
    assert merged["images"] == 40 and merged["missing_shards"] == []


def test_bad_inputs_are_recorded_not_fatal(tiny_ckpt, synth, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((synth / "JPEGImages").glob("*.jpg"))[0]
    shutil.copy(good, folder / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    (folder / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    rgb = np.array(Image.open(good))
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")  # 16-bit grey
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"folder:{folder}", "--out", tmp_path / "out", "--quiet"]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    reasons = {f["id"]: f["reason"] for f in summary["failures"]}
    assert summary["ok"] == 4 and set(reasons) == {"empty", "text", "cut"}
    assert "empty file" in reasons["empty"] and "not a recognised image" in reasons["text"]
    assert "truncated" in reasons["cut"]
    assert read_label_png(tmp_path / "out" / "labels" / "deep16.png").shape == rgb.shape[:2]
    strict = CliRunner().invoke(cli, list(map(str, [*args[:-3], "--out", tmp_path / "o2", "--fail-on-error"])))
    assert strict.exit_code == 1


def test_tags_restrict_classes_and_predictions_fill_in(tiny_ckpt, synth, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = sorted((synth / "JPEGImages").glob("*.jpg"))[:4]
    for p in src:
        shutil.copy(p, folder / p.name)
    (tmp_path / "tags.json").write_text(json.dumps({src[0].name: ["cow"], src[1].name: ["boat", "car"]}))
    _label("--ckpt", tiny_ckpt, "--data", f"folder:{folder}:{tmp_path / 'tags.json'}", "--out", tmp_path / "o",
           "--refine", "none", "--quiet", "--bkg-thresh", "0.0")  # fmt: skip
    labels = _pngs(tmp_path / "o" / "labels")
    assert set(np.unique(labels[src[0].stem])) <= {0, 3}
    assert set(np.unique(labels[src[1].stem])) <= {0, 1, 8}
    records = [
        json.loads(line) for line in (tmp_path / "o" / "journal" / "shard-0-of-1.jsonl").read_text().splitlines()
    ]
    given = {r["id"]: r["tags_given"] for r in records}
    assert given == {src[0].stem: True, src[1].stem: True, src[2].stem: False, src[3].stem: False}
    for stem in (src[2].stem, src[3].stem):  # untagged images still get classes from the classifier
        assert (labels[stem] > 0).any()


def test_bench_label_reports_baseline_and_ratio(tiny_ckpt, synth, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "label", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--images", 4, "--batch", 2,
            "--backends", "torch", "--crf-impl", "torch,pydensecrf", "--json", out]  # fmt: skip
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pipeline"], r["batch"], r["crf_impl"]) for r in rows] == [
        ("research loop", 1, "pydensecrf"), ("wsss label", 2, "torch"), ("wsss label", 2, "pydensecrf")]  # fmt: skip
    assert rows[0]["speedup"] == 1.0 and rows[1]["images_per_s"] > 0 and "cam_s" in rows[1]["stages_s"]
    printed = [line for line in result.output.splitlines() if "wsss label" in line]
    assert printed[0].endswith(rows[1]["timeline"]["bound_by"])  # the timeline is printed per row
    assert "torch" in json.loads(out.read_text())["device"]
    refused = CliRunner().invoke(cli, list(map(str, [*args[:-4], "--crf-impl", "gpu"])))
    assert refused.exit_code == 2 and "--crf-impl" in refused.output


def test_device_and_precision_are_refused_in_one_line_before_any_work(tiny_ckpt, synth, tmp_path):
    base = ["label", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", tmp_path / "o", "--quiet"]
    fp16 = CliRunner().invoke(cli, list(map(str, [*base, "--precision", "fp16"])))
    assert fp16.exit_code == 2 and "--precision fp16 runs on CUDA devices only" in fp16.output
    if not torch.cuda.is_available():
        gpu = CliRunner().invoke(cli, list(map(str, [*base, "--device", "cuda:1"])))
        assert gpu.exit_code == 2 and "--device cuda:1: no CUDA GPU is visible" in gpu.output
    assert not (tmp_path / "o").exists()


def _agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys() and a
    return float(np.mean([np.mean(a[k] == b[k]) for k in a]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="labels on a CUDA GPU; none on this machine")
def test_label_on_cuda_matches_the_cpu(tiny_ckpt, synth, tmp_path):
    """GPU check: the labeler on cuda:0 (Triton post-processing, PAR on the device, ORT's CUDA provider with IO
    binding where onnxruntime-gpu is installed) against the CPU run; bf16 within a stated tolerance."""
    from wsss.export.onnx import cuda_provider_usable

    CliRunner().invoke(cli, ["export", "--ckpt", str(tiny_ckpt), "--onnx", str(tmp_path / "m.onnx")])
    runs = {"cpu": ["--ckpt", tiny_ckpt], "cuda": ["--ckpt", tiny_ckpt, "--device", "cuda:0"],
            "bf16": ["--ckpt", tiny_ckpt, "--device", "cuda", "--precision", "bf16"]}  # fmt: skip
    if cuda_provider_usable():
        runs["onnx-cuda"] = ["--engine", tmp_path / "m.onnx", "--device", "cuda:0"]
    for name, args in runs.items():
        _label(*args, "--data", f"voc:{synth}:val", "--out", tmp_path / name, "--refine", "par", "--save-cams",
               "--quiet")  # fmt: skip
    cpu = _pngs(tmp_path / "cpu" / "labels")
    for name in runs:
        summary = json.loads((tmp_path / name / "summary-shard-0-of-1.json").read_text())
        assert summary["ok"] == 6 and summary["device"] == ("cpu" if name == "cpu" else "cuda:0")
        floor = 0.97 if name == "bf16" else 0.999  # stated tolerances: bf16 rounding; arg-max ties on float noise
        assert _agreement(cpu, _pngs(tmp_path / name / "labels")) >= floor, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks the labeler on a CUDA GPU; none here")
def test_bench_label_on_cuda_exports_a_network_that_runs_there(tiny_ckpt, synth, tmp_path):
    """Defect 4: the network moves to the GPU first, then the ONNX export traces a CPU copy of it."""
    from wsss.export.onnx import cuda_provider_usable

    backends = "torch,onnx" if cuda_provider_usable() else "torch"
    out = tmp_path / "bench.json"
    args = ["bench", "label", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--images", 4, "--batch", 2,
            "--backends", backends, "--device", "cuda", "--refine", "par", "--json", out]  # fmt: skip
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert [r["backend"] for r in record["rows"][1:]] == backends.split(",") and record["device"]["gpu"]


def test_rle_round_trip_column_major_zeros_first():
    from wsss.runtime.rle import encode_label_map, rle_decode, rle_encode

    assert rle_encode(np.array([[0, 1], [1, 1]]))["counts"] == [1, 3]  # column-major: 0, 1 | 1, 1
    assert rle_encode(np.array([[1, 0]]))["counts"] == [0, 1, 1]  # starts with a zero-length run of zeros
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (3, 4)]:
        mask = rng.random(shape) < 0.5
        assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    label = np.array([[0, 2, 2], [255, 2, 5]], np.uint8)
    segments = encode_label_map(label, [f"c{i}" for i in range(6)])
    assert [(s["category_id"], s["area"], s["bbox"]) for s in segments] == [(2, 3, [1, 0, 2, 2]), (5, 1, [2, 1, 1, 1])]
