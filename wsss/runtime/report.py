"""A labeling run at a glance: one static HTML page in the labeler's output folder (``report.html``).

No server, no network: the CSS is inline and every image is a file in the output folder, referenced by a relative
path. The page shows the counts (labelled, failed, skipped), the failures and skipped entries with their reasons,
each class's share of the labelled pixels, per-class IoU where ground truth is given, and a gallery of titled
overlays with a class legend, lowest confidence first. An item's confidence is the one the labeler records in its
journal entry: the mean CAM score of the seed's foreground pixels (``wsss.runtime.labeler._confidence``).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..cam.overlay import save_overlay
from ..data.datasets import Sample, WSSSDataset
from ..data.palette import IGNORE_INDEX, PALETTE, read_label_png
from ..eval.evaluate import evaluate_dataset, evaluate_folders
from .labeler import JOURNAL

REPORT = "report.html"
GALLERY_DIR = "report"  # the overlays drawn for the report's gallery, OUT/report/ID.png
GALLERY = 48  # overlays in the gallery by default

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.counts{display:flex;gap:16px}.count{padding:10px 18px;border:1px solid #ddd;border-radius:6px}
.count b{display:block;font-size:22px}.sw{display:inline-block;width:12px;height:12px;border:1px solid #555;
vertical-align:middle;margin-right:6px}.bar{height:10px;background:#4a7bd0;display:inline-block}
.legend span{margin-right:14px;white-space:nowrap}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px}figure img{max-width:100%;height:auto}
figcaption{font-size:13px;word-break:break-all}.muted{color:#777}
"""


def write_report(out_dir: str | Path, data: WSSSDataset | None = None, gt_dir: str | Path | None = None,
                 gallery: int = GALLERY) -> Path:  # fmt: skip
    """Write ``out_dir/report.html`` for a finished labeling run (its ``summary.json`` and journal); returns it.

    Args:
        out_dir: the labeler's output folder (after ``wsss label merge`` for a sharded run).
        data: the dataset that was labelled: the gallery's overlays are drawn from its images, and its own masks,
            where it has them, give the per-class IoU. Without it the gallery shows the run's own overlays
            (``--overlays``) or the label PNGs.
        gt_dir: ground-truth label PNGs (``GT_DIR/ID.png``), instead of the dataset's masks.
        gallery: how many items the gallery shows, lowest confidence first.
    """
    out = Path(out_dir)
    summary = _read_summary(out)
    names = list(summary["class_names"])
    cfg = summary["config"]
    records = read_journal(out)
    ok = sorted((r for r in records.values() if r["status"] == "ok"), key=_by_confidence)
    label_dir = cfg.get("label_dir") or cfg.get("seed_dir")
    ids = [r["id"] for r in ok]
    shares = pixel_shares(out / label_dir, ids, len(names)) if label_dir and ids else np.zeros(256)
    scores = _scores(out, cfg, ids, data, gt_dir, names)
    cards = [_card(out, r, cfg, data, gt_dir, names) for r in ok[:gallery]]
    page = _page(out, summary, names, shares, scores, cards, len(ok))
    path = out / REPORT
    path.write_text(page, encoding="utf-8")
    return path


def read_journal(out: Path) -> dict[str, dict]:
    """The last record of every id over all shards' journals (a torn last line is skipped)."""
    records: dict[str, dict] = {}
    for path in sorted((out / JOURNAL).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                records[record["id"]] = record
            except (json.JSONDecodeError, KeyError):
                continue
    return records


def _read_summary(out: Path) -> dict:
    path = out / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary (a sharded run needs `wsss label merge {out}` first)")
    return json.loads(path.read_text())


def _by_confidence(record: dict) -> tuple:
    """Lowest confidence first; records without one (older runs) last, by id."""
    confidence = record.get("confidence")
    return (confidence is None, confidence if confidence is not None else 0.0, record["id"])


def pixel_shares(label_dir: Path, ids: Sequence[str], num_classes: int) -> np.ndarray:
    """(256,) fraction of all labelled pixels per value (0..C-1 classes, 255 ignore) over the ids' label PNGs."""
    counts = np.zeros(256, np.int64)
    for id_ in ids:
        counts += np.bincount(read_label_png(label_dir / f"{id_}.png").ravel(), minlength=256)
    return counts / max(counts.sum(), 1)


def _scores(out: Path, cfg: dict, ids: list[str], data, gt_dir, names) -> dict[str, dict | str]:
    """Per kind of output written (labels, seeds): the evaluation dict, or the reason it could not be scored;
    {} without ground truth."""
    kinds = {k: cfg.get(k) for k in ("label_dir", "seed_dir") if cfg.get(k)}
    has_masks = data is not None and any(data.mask_path(i) is not None for i in range(len(data)))
    if gt_dir is None and not has_masks:
        return {}
    scores: dict[str, dict | str] = {}
    for folder in kinds.values():
        try:
            if gt_dir is not None:
                with_gt = [i for i in ids if (Path(gt_dir) / f"{i}.png").is_file()]
                scores[folder] = evaluate_folders(out / folder, gt_dir, names, ids=with_gt)
            else:
                index = {id_: i for i, id_ in enumerate(data.ids)}
                with_gt = [i for i in ids if i in index and data.mask_path(index[i]) is not None]
                scores[folder] = evaluate_dataset(out / folder, data, ids=with_gt)
        except (FileNotFoundError, ValueError) as err:
            scores[folder] = f"not scored: {err}"
    return scores


def _card(out: Path, record: dict, cfg: dict, data, gt_dir, names) -> dict:
    """One gallery item: its record and the overlay (or label PNG) to show, relative to ``out``."""
    id_ = record["id"]
    picture = _draw(out, id_, cfg, data, gt_dir, names) if data is not None else None
    if picture is None:
        own = out / "overlays" / f"{id_}.png"
        label_dir = cfg.get("label_dir") or cfg.get("seed_dir")
        picture = own if own.is_file() else out / label_dir / f"{id_}.png" if label_dir else None
    return {**record, "picture": None if picture is None else picture.relative_to(out).as_posix()}


def _draw(out: Path, id_: str, cfg: dict, data: WSSSDataset, gt_dir, names) -> Path | None:
    """The titled overlay strip of one item into ``out/report/ID.png``; None where it cannot be drawn."""
    try:
        sample = data[data.ids.index(id_)]
    except (ValueError, OSError):  # not the labelled dataset's id, or its file changed since
        return None
    if gt_dir is not None and (Path(gt_dir) / f"{id_}.png").is_file():
        sample = Sample(sample.id, sample.image, sample.labels, read_label_png(Path(gt_dir) / f"{id_}.png"))
    if sample.mask is not None and sample.mask.shape != sample.image.shape[:2]:
        sample = Sample(sample.id, sample.image, sample.labels, None)
    seed_dir, label_dir = cfg.get("seed_dir"), cfg.get("label_dir")
    refined = label_dir if cfg.get("refine", "none") != "none" else None
    seed_from = seed_dir or (label_dir if refined is None else None)
    seed, mask = (read_label_png(out / d / f"{id_}.png") if d else None for d in (seed_from, refined))
    path = out / GALLERY_DIR / f"{id_}.png"
    save_overlay(path, sample, seed, mask, names)
    return path


# ------------------------------------------------------------------------------------------------------------ html


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _src(relative: str) -> str:
    return _e(quote(relative))


def _swatch(value: int) -> str:
    r, g, b = (int(c) for c in PALETTE[value])
    return f'<span class="sw" style="background:rgb({r},{g},{b})"></span>'


def _name(value: int, names: Sequence[str]) -> str:
    return "ignore" if value == IGNORE_INDEX else names[value] if value < len(names) else f"class {value}"


def _page(out: Path, summary: dict, names, shares, scores, cards, n_ok: int) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>wsss label report: {_e(out.name)}</title>",
        f"<style>{_CSS}</style></head>",
        "<body>",
        f"<h1>wsss label report: {_e(out.name)}</h1>",
        _meta(summary),
        _counts(summary),
        _legend(shares, names),
        _shares_table(shares, names),
        *(_score_table(folder, s, names) for folder, s in scores.items()),
        _gallery(cards, names, n_ok),
        _failures(summary),
        _skips(summary),
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _meta(summary: dict) -> str:
    cfg = summary["config"]
    sha = summary.get("checkpoint_sha256") or summary.get("artifact_sha256") or ""
    facts = [f"method {summary.get('method')}", f"refine {cfg.get('refine')}", f"wsss {summary.get('package_version')}"]
    if sha:
        facts.append(f"weights sha256 {sha[:12]}")
    return f'<p class="muted">{_e(" · ".join(facts))}</p>'


def _counts(summary: dict) -> str:
    items = [("images", summary["images"]), ("labelled", summary["ok"]), ("failed", summary["failed"]),
             ("skipped", summary.get("skipped", 0))]  # fmt: skip
    cells = "".join(f'<div class="count"><b>{_e(n)}</b>{_e(what)}</div>' for what, n in items)
    return f'<h2>Counts</h2><div class="counts">{cells}</div>'


def _legend(shares: np.ndarray, names) -> str:
    present = [int(v) for v in np.flatnonzero(shares)]
    spans = "".join(f"<span>{_swatch(v)}{_e(_name(v, names))}</span>" for v in present)
    return f'<h2>Classes in the labels</h2><p class="legend">{spans or "none"}</p>'


def _shares_table(shares: np.ndarray, names) -> str:
    rows = []
    for v in [*range(len(names)), IGNORE_INDEX]:
        if v == IGNORE_INDEX and not shares[v]:
            continue
        pct = 100 * shares[v]
        rows.append(f'<tr><td>{_swatch(v)}{_e(_name(v, names))}</td><td class="num">{pct:.2f}%</td>'
                    f'<td><span class="bar" style="width:{pct * 3:.1f}px"></span></td></tr>')  # fmt: skip
    head = '<tr><th>class</th><th class="num">share of labelled pixels</th><th></th></tr>'
    return f"<h2>Pixel shares</h2><table>{head}{''.join(rows)}</table>"


def _score_table(folder: str, score: dict | str, names) -> str:
    title = f"<h2>Against the ground truth: {_e(folder)}/</h2>"
    if isinstance(score, str):
        return f"{title}<p>{_e(score)}</p>"
    head = '<tr><th>class</th><th class="num">IoU</th><th class="num">precision</th><th class="num">recall</th></tr>'
    rows = [f"<tr><td>{_swatch(k)}{_e(name)}</td>" + "".join(_pct(score[key][k]) for key in
            ("iou", "precision", "recall")) + "</tr>" for k, name in enumerate(names)]  # fmt: skip
    miou = f"<p>mIoU {_pct_text(score['miou'])} over {score['num_images']} images</p>"
    return f"{title}{miou}<table>{head}{''.join(rows)}</table>"


def _pct(value) -> str:
    return f'<td class="num">{_pct_text(value)}</td>'


def _pct_text(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


def _gallery(cards: list[dict], names, n_ok: int) -> str:
    figures = []
    for c in cards:
        img = f'<img src="{_src(c["picture"])}" alt="{_e(c["id"])}" loading="lazy">' if c["picture"] else ""
        confidence = c.get("confidence")
        conf = "confidence n/a" if confidence is None else f"confidence {confidence:.3f}"
        classes = ", ".join(_name(k, names) for k in c.get("classes", [])) or "no foreground"
        figures.append(f"<figure>{img}<figcaption><b>{_e(c['id'])}</b> · {_e(conf)} · {_e(classes)}"
                       "</figcaption></figure>")  # fmt: skip
    note = (f'<p class="muted">{len(cards)} of {n_ok} labelled images, lowest confidence first (the mean CAM score '
            "of the seed's foreground pixels).</p>")  # fmt: skip
    return f'<h2>Gallery</h2>{note}<div class="gallery">{"".join(figures)}</div>'


def _failures(summary: dict) -> str:
    rows = "".join(f"<tr><td>{_e(f['id'])}</td><td>{_e(f['reason'])}</td></tr>" for f in summary["failures"])
    body = f"<table><tr><th>id</th><th>reason</th></tr>{rows}</table>" if rows else "<p>none</p>"
    return f"<h2>Failed ({len(summary['failures'])})</h2>{body}"


def _skips(summary: dict) -> str:
    skips = summary.get("skips", [])
    rows = "".join(f"<tr><td>{_e(s['entry'])}</td><td>{_e(s['reason'])}</td></tr>" for s in skips)
    body = f"<table><tr><th>entry</th><th>reason</th></tr>{rows}</table>" if rows else "<p>none</p>"
    return f"<h2>Skipped ({len(skips)})</h2>{body}"
