"""A user's own folder as it is (odd files, shared stems, subfolders), the titled overlays and the HTML report."""

from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsss.cam.overlay import draw_strip, legend_entries, save_overlay
from wsss.cli import cli
from wsss.data.datasets import Sample, VOCDataset
from wsss.data.io import decode_image
from wsss.data.palette import PALETTE, VOC_CLASSES, read_label_png
from wsss.runtime.report import GALLERY_DIR, REPORT, read_journal, write_report

# id -> file name
GOOD = {"exif rotated": "exif rotated.jpg", "deep16": "deep16.png", "cmyk": "cmyk.jpg", "palette": "palette.png",
        "rgb of palette": "rgb of palette.png", "one": "one.png", "tall": "tall.png",
        "café au lait ñ": "café au lait ñ.jpg", "truncated.png": "truncated.png",
        "sub/nested": "sub/nested.jpg"}  # fmt: skip
FAILED = {"truncated.jpg": "truncated or corrupt", "empty": "empty file (0 bytes)",
          "x": "not a recognised image format"}  # fmt: skip
SKIPPED = {"gone.jpg": "a dangling link", "dir.jpg": "a folder, not an image file", "notes.txt": "not an image file"}


def _odd_folder(src: Path, folder: Path) -> Path:
    """The issue's folder of odd files: every good image has content the tiny network has seen."""
    rgb = np.array(Image.open(src).convert("RGB"))
    (folder / "sub").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(folder / "exif rotated.jpg", exif=exif)
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    pal = Image.fromarray(rgb).quantize(64)
    pal.save(folder / "palette.png")
    pal.convert("RGB").save(folder / "rgb of palette.png")  # the same pixels as RGB: the same labels
    Image.fromarray(rgb[:1, :1]).save(folder / "one.png")
    Image.fromarray(np.repeat(rgb[:, :3], 5000 // rgb.shape[0] + 1, 0)[:5000]).save(folder / "tall.png")  # 3x5000
    Image.fromarray(rgb).save(folder / "café au lait ñ.jpg")
    Image.fromarray(rgb).save(folder / "truncated.png")
    (folder / "truncated.jpg").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    Image.fromarray(rgb).save(folder / "sub" / "nested.jpg")
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "dir.jpg").mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "x.png").write_text("not an image at all")
    (folder / "notes.txt").write_text("a note")
    return folder


@pytest.fixture(scope="module")
def odd_run(synth, tiny_ckpt, tmp_path_factory):
    """`wsss label --report` over the odd folder, with overlays for every item."""
    tmp = tmp_path_factory.mktemp("odd")
    folder = _odd_folder(sorted((synth / "JPEGImages").glob("*.jpg"))[0], tmp / "photos")
    out = tmp / "out"
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"folder:{folder}", "--out", out, "--refine", "none",
            "--overlays", 20, "--report", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return folder, out, result.output


def test_an_odd_folder_labels_every_good_image_and_reports_every_other_entry(odd_run):
    folder, out, output = odd_run
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (len(GOOD), len(FAILED), len(SKIPPED))
    assert "10 labelled, 3 failed, 3 skipped" in output
    failures = {f["id"]: f["reason"] for f in summary["failures"]}
    assert failures.keys() == FAILED.keys()
    assert all(FAILED[k] in failures[k] for k in FAILED), failures
    skips = {s["entry"]: s["reason"] for s in summary["skips"]}
    assert skips.keys() == SKIPPED.keys() and all(skips[k].startswith(SKIPPED[k]) for k in SKIPPED), skips
    for id_, name in GOOD.items():  # each label has the decoded (EXIF-rotated) image's size, at OUT/labels/ID.png
        assert read_label_png(out / "labels" / f"{id_}.png").shape == decode_image(folder / name).shape[:2], id_
    assert read_label_png(out / "labels" / "exif rotated.png").shape == Image.open(folder / "cmyk.jpg").size  # turned
    same = [read_label_png(out / "labels" / f"{k}.png") for k in ("palette", "rgb of palette")]
    assert np.array_equal(*same)  # a palette PNG decodes to its RGB pixels
    records = read_journal(out)
    assert all(0.0 <= records[k]["confidence"] <= 1.0 for k in GOOD)


def test_resume_after_an_odd_run_redoes_nothing(odd_run, tiny_ckpt, tmp_path):
    folder, out, _ = odd_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"folder:{folder}", "--out", copy, "--refine", "none",
            "--quiet", "--resume"]  # fmt: skip
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "summary-shard-0-of-1.json").read_text())["processed_this_run"] == 0


class _PageCheck(HTMLParser):
    """Tags must balance (void elements aside); collects every src and href."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.links, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}> at {self.getpos()}")


def _check_page(out: Path) -> tuple[str, list[str]]:
    page = (out / REPORT).read_text(encoding="utf-8")
    check = _PageCheck()
    check.feed(page)
    check.close()
    assert not check.errors and not check.stack, (check.errors, check.stack)
    assert page.startswith("<!DOCTYPE html>") and "http:" not in page and "https:" not in page  # no network
    for link in check.links:
        target = (out / unquote(link)).resolve()
        assert target.is_file() and target.is_relative_to(out.resolve()), link
    return page, check.links


def test_the_report_is_valid_html_linking_only_to_files_in_the_folder(odd_run):
    _, out, output = odd_run
    assert f"report -> {out / REPORT}" in output
    page, links = _check_page(out)
    assert len(links) == len(GOOD)  # the gallery shows every labelled image, drawn for the report
    assert all(unquote(link).startswith(f"{GALLERY_DIR}/") for link in links)
    assert (out / GALLERY_DIR / "sub" / "nested.png").is_file() and (out / "overlays" / "sub" / "nested.png").is_file()
    for id_, reason in FAILED.items():
        assert f"<td>{id_}</td>" in page and reason in page
    for entry in SKIPPED:
        assert f"<td>{entry}</td>" in page
    confidences = [read_journal(out)[unquote(link)[len(GALLERY_DIR) + 1 : -4]]["confidence"] for link in links]
    assert confidences == sorted(confidences)  # lowest confidence first


def test_label_report_rewrites_the_page_for_a_finished_run(odd_run, tmp_path):
    folder, out, _ = odd_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    result = CliRunner().invoke(cli, ["label", "report", str(copy), "--data", f"folder:{folder}", "--gallery", "3"])
    assert result.exit_code == 0 and f"report -> {copy / REPORT}" in result.output, result.output
    assert len(_check_page(copy)[1]) == 3
    missing = CliRunner().invoke(cli, ["label", "report", str(tmp_path)])
    assert missing.exit_code == 1 and "summary.json: no summary" in missing.output


def test_report_scores_against_the_datasets_masks_and_a_gt_folder(synth, tiny_ckpt, tmp_path):
    out = tmp_path / "val"
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"voc:{synth}:val", "--out", out, "--refine", "none",
            "--report", "--report-gallery", 4, "--quiet"]  # fmt: skip
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    page, links = _check_page(out)
    assert len(links) == 4 and "Against the ground truth: labels/" in page and "mIoU" in page
    from wsss.eval.evaluate import evaluate_folders

    names = (synth / "classes.txt").read_text().split()
    expected = evaluate_folders(out / "labels", synth / "SegmentationClass", names, ids=VOCDataset(synth, "val").ids)
    assert f"mIoU {100 * expected['miou']:.1f}% over 6 images" in page
    # no dataset: the page shows the label PNGs; a GT folder still scores
    path = write_report(out, gt_dir=synth / "SegmentationClass", gallery=2)
    page, links = _check_page(out)
    assert path == out / REPORT and len(links) == 2 and all(unquote(x).startswith("labels/") for x in links)
    assert f"mIoU {100 * expected['miou']:.1f}% over 6 images" in page


def test_overlay_panels_have_titles_and_a_legend_of_the_classes_shown(tmp_path):
    image = np.full((20, 30, 3), 90, np.uint8)
    seed = np.zeros((20, 30), np.uint8)
    seed[5:10, 5:10] = 8
    gt = seed.copy()
    gt[0, 0] = 255
    gt[12:15, 12:15] = 15
    assert legend_entries([seed, gt], VOC_CLASSES) == [("cat", tuple(PALETTE[8])), ("person", tuple(PALETTE[15])),
                                                       ("ignore", tuple(PALETTE[255]))]  # fmt: skip
    path = tmp_path / "a" / "b.png"
    save_overlay(path, Sample("b", image, None, gt), seed, None, VOC_CLASSES)
    strip = np.array(Image.open(path))
    bare = np.array(draw_strip([("", image)] * 3, []))
    assert strip.shape[0] > bare.shape[0] and strip.shape[1] >= bare.shape[1]  # title and legend rows
    colours = {tuple(c) for c in strip.reshape(-1, 3)}
    assert {tuple(PALETTE[15]), tuple(PALETTE[255])} <= colours  # the legend's swatches (GT panel shows them too)
    titled = np.array(draw_strip([("image", image)], []))
    assert (titled[:15] < 128).any() and not (np.array(draw_strip([("", image)], []))[:15] < 128).any()  # text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_a_failure_with_its_reason(synth, tiny_ckpt, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    src = sorted((synth / "JPEGImages").glob("*.jpg"))[0]
    shutil.copy(src, folder / "ok.jpg")
    shutil.copy(src, folder / "locked.jpg")
    (folder / "locked.jpg").chmod(0)
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"folder:{folder}", "--out", tmp_path / "o", "--quiet"]
    assert CliRunner().invoke(cli, list(map(str, args))).exit_code == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["ok"] == 1 and "cannot open" in summary["failures"][0]["reason"]


def test_an_item_no_network_pass_can_take_fails_alone(synth, tiny_ckpt, tmp_path):
    """At native size a 1x1 image has no 0.5 scale: that item fails with the reason, its chunk-mates are labelled."""
    folder = tmp_path / "p"
    folder.mkdir()
    src = sorted((synth / "JPEGImages").glob("*.jpg"))
    rgb = np.array(Image.open(src[0]))
    Image.fromarray(rgb[:1, :1]).save(folder / "dot.png")
    for p in src[:2]:
        shutil.copy(p, folder / p.name)
    args = ["label", "--ckpt", tiny_ckpt, "--data", f"folder:{folder}", "--out", tmp_path / "o", "--quiet",
            "--input-size", 0, "--refine", "none", "--batch", 3]  # fmt: skip
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["ok"] == 2 and [f["id"] for f in summary["failures"]] == ["dot"]
    assert summary["failures"][0]["reason"].startswith("RuntimeError: ")


def test_par_takes_an_image_with_a_one_pixel_side():
    import torch

    from wsss.cam.par import refine_labels

    for h, w in ((1, 1), (1, 7), (5, 1)):
        labels = refine_labels(torch.rand(1, 3, h, w), torch.rand(1, 2, h, w), torch.ones(1, 2), 0.5)
        assert labels.shape == (1, h, w)
