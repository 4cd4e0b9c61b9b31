"""Embedded synthetic WSSS benchmark with the co-occurrence problem SeCo attacks.

Each image holds one to three textured shapes on a cluttered background. Some classes come with an unlabeled
*context* region most of the time (boat on water, train on rails, cow on grass), and some foreground classes
co-occur (a person rides most horses). A classifier trained from image-level tags alone learns that water means
"boat", so its CAMs leak onto the water: the false activation SeCo's decomposition is meant to remove.

Output is a PASCAL VOC layout (see ``generate_synth``) plus ``ContextMask/ID.png``: each context pixel carries the id
of the class it co-occurs with (0 elsewhere), so ``wsss eval --context`` can measure the leak.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .palette import IGNORE_INDEX, save_label_png

Rng = np.random.Generator


@dataclass(frozen=True)
class ClassSpec:
    """A synthetic foreground class: a shape, a texture, a colour and an optional context region."""

    name: str
    shape: str
    texture: str
    rgb: tuple[int, int, int]
    context: str | None = None  # context region drawn with this class most of the time
    aspect: float = 1.0  # width / height of the bounding box


# The demo classes. Contexts: boat-water, train-rails, cow-grass. Co-occurring foreground: person rides horse.
DEMO_CLASSES = (
    ClassSpec("boat", "hull", "stripes_h", (200, 40, 40), context="water", aspect=1.8),
    ClassSpec("train", "rect", "windows", (230, 180, 30), context="rails", aspect=2.4),
    ClassSpec("cow", "ellipse", "blotches", (235, 235, 225), context="grass", aspect=1.5),
    ClassSpec("person", "person", "dots", (240, 150, 170), aspect=0.5),
    ClassSpec("horse", "ellipse", "stripes_v", (140, 80, 40), aspect=1.4),
    ClassSpec("bottle", "bottle", "gradient", (40, 160, 90), aspect=0.45),
    ClassSpec("cat", "star", "checker", (240, 130, 20)),
    ClassSpec("car", "car", "gradient", (40, 90, 210), aspect=1.9),
)
CO_OCCURRENCE = {"horse": ("person", 0.7)}  # P(person | horse) = 0.7
CONTEXTS = ("water", "rails", "grass")

SHAPES = ("ellipse", "rect", "hull", "star", "triangle", "cross", "person", "bottle", "car", "ring")
TEXTURES = ("stripes_h", "stripes_v", "stripes_d", "checker", "dots", "blotches", "windows", "gradient")


@dataclass(frozen=True)
class SynthConfig:
    """Generator settings; the defaults size the CPU demo."""

    n_train: int = 1000
    n_val: int = 300
    min_size: int = 96
    max_size: int = 128
    seed: int = 0
    p_context: float = 0.85  # P(context | its class)
    p_context_alone: float = 0.08  # P(a context region without its class), per image
    max_objects: int = 3
    corpus: str = "demo"  # "demo": DEMO_CLASSES; "broad": 24 random classes (backbone pre-training)


def broad_classes(seed: int, n: int = 24) -> tuple[ClassSpec, ...]:
    """Random shape x texture x colour classes for pre-training a backbone (no demo class is reproduced exactly)."""
    rng = np.random.default_rng(seed + 7919)
    specs = []
    for i in range(n):
        shape, texture = SHAPES[rng.integers(len(SHAPES))], TEXTURES[rng.integers(len(TEXTURES))]
        rgb = tuple(int(v) for v in rng.integers(20, 236, 3))
        context = CONTEXTS[i] if i < len(CONTEXTS) else None
        specs.append(ClassSpec(f"{shape}-{texture}-{i}", shape, texture, rgb, context, float(rng.uniform(0.5, 2.0))))
    return tuple(specs)


# ---------------------------------------------------------------------------------------------------- shapes


def _poly(points: np.ndarray, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(points * [w - 1, h - 1]).astype(np.int32)], 1)
    return mask


def _shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """A binary mask of ``shape`` filling an (h, w) box; coordinates are drawn in the unit square."""
    m = np.zeros((h, w), np.uint8)
    c, ax = (w // 2, h // 2), (max(w // 2 - 1, 1), max(h // 2 - 1, 1))
    if shape == "ellipse":
        cv2.ellipse(m, c, ax, 0, 0, 360, 1, -1)
    elif shape == "ring":
        cv2.ellipse(m, c, ax, 0, 0, 360, 1, -1)
        cv2.ellipse(m, c, (ax[0] // 2, ax[1] // 2), 0, 0, 360, 0, -1)
    elif shape == "rect":
        m[1:-1, 1:-1] = 1
    elif shape == "hull":
        m = _poly(np.array([[0, 0.45], [1, 0.45], [0.8, 1], [0.2, 1]]), h, w)
        m |= _poly(np.array([[0.45, 0], [0.75, 0.42], [0.45, 0.42]]), h, w)  # sail
    elif shape == "triangle":
        m = _poly(np.array([[0.5, 0], [1, 1], [0, 1]]), h, w)
    elif shape == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.22)
        m = _poly(np.stack([0.5 + r * np.cos(t), 0.5 + r * np.sin(t)], 1), h, w)
    elif shape == "cross":
        m[int(h * 0.35) : int(h * 0.65) + 1, :] = 1
        m[:, int(w * 0.35) : int(w * 0.65) + 1] = 1
    elif shape == "person":
        cv2.circle(m, (w // 2, h // 6), max(min(w, h) // 5, 1), 1, -1)
        m |= _poly(np.array([[0.2, 0.3], [0.8, 0.3], [0.7, 1], [0.3, 1]]), h, w)
    elif shape == "bottle":
        m = _poly(np.array([[0.4, 0], [0.6, 0], [0.6, 0.3], [0.95, 0.45], [0.95, 1], [0.05, 1], [0.05, 0.45]]), h, w)
        m[: h // 3, int(w * 0.35) : int(w * 0.65) + 1] = 1
    elif shape == "car":
        m = _poly(np.array([[0, 0.4], [0.25, 0.4], [0.35, 0.05], [0.7, 0.05], [0.8, 0.4], [1, 0.4], [1, 0.8]]), h, w)
        m |= _poly(np.array([[0, 0.4], [1, 0.8], [0, 0.8]]), h, w)
        for cx in (0.25, 0.75):
            cv2.circle(m, (int(cx * w), int(0.8 * h)), max(h // 6, 1), 1, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return m


# ---------------------------------------------------------------------------------------------------- textures


def _texture(name: str, h: int, w: int, rgb: tuple[int, int, int], rng: Rng) -> np.ndarray:
    """An (h, w, 3) float32 texture in [0, 255] built around the colour ``rgb`` with a random phase."""
    base = np.clip(np.array(rgb, np.float32) + rng.normal(0, 12, 3), 0, 255)
    dark = base * 0.35
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = float(rng.uniform(4, 7))
    phase = float(rng.uniform(0, period))
    if name == "stripes_h":
        t = ((yy + phase) // (period / 2)) % 2
    elif name == "stripes_v":
        t = ((xx + phase) // (period / 2)) % 2
    elif name == "stripes_d":
        t = ((xx + yy + phase) // (period / 2)) % 2
    elif name == "checker":
        t = (((xx + phase) // period) + ((yy + phase) // period)) % 2
    elif name == "dots":
        dx, dy = (xx + phase) % period - period / 2, (yy + phase) % period - period / 2
        t = dx**2 + dy**2 > (period / 3.5) ** 2
    elif name == "blotches":
        noise = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 2.5)
        t = noise > 0.1 * noise.std()
    elif name == "windows":
        t = ~((((xx + phase) % period) < period * 0.55) & (((yy + phase) % period) < period * 0.55) & (yy > h * 0.2))
    elif name == "gradient":
        t = (xx / max(w - 1, 1) * 0.6 + yy / max(h - 1, 1) * 0.4) ** 1.5
    else:
        raise ValueError(f"unknown texture {name!r}; choose from {TEXTURES}")
    t = t.astype(np.float32)[..., None]
    img = t * base + (1 - t) * dark
    return img + rng.normal(0, 6, (h, w, 3)).astype(np.float32)


def _context_region(kind: str, h: int, w: int, top: int, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    """Texture (h, w, 3) and mask (h, w) of a context band whose upper edge lies near row ``top``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    amp, freq = rng.uniform(1, 3), rng.uniform(0.08, 0.2)
    edge = top + amp * np.sin(xx[0] * freq + rng.uniform(0, 6.3))
    if kind == "water":
        mask = yy >= edge[None]
        waves = 0.5 + 0.5 * np.sin(yy * 1.3 + 2.0 * np.sin(xx * 0.25 + rng.uniform(0, 6.3)))
        img = np.stack([20 + 30 * waves, 80 + 50 * waves, 160 + 70 * waves], -1)
    elif kind == "rails":
        mask = (yy >= top) & (yy < top + max(h * 0.22, 8))
        sleepers = ((xx + rng.uniform(0, 8)) % 8) < 3
        img = np.where(sleepers[..., None], [70, 45, 25], [130, 110, 90]).astype(np.float32)
        for r in (top + h * 0.05, top + h * 0.15):
            img[np.abs(yy - r) < 1.0] = [190, 190, 200]
    elif kind == "grass":
        mask = yy >= edge[None]
        blades = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigmaX=0.6, sigmaY=2.0)
        img = np.stack([50 + 25 * blades, 150 + 40 * blades, 40 + 20 * blades], -1)
    else:
        raise ValueError(f"unknown context {kind!r}; choose from {CONTEXTS}")
    return img.astype(np.float32) + rng.normal(0, 5, (h, w, 3)).astype(np.float32), mask


def _background(h: int, w: int, rng: Rng) -> np.ndarray:
    """A smooth two-colour gradient with low-frequency noise and random clutter blobs and lines."""
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    a = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1)
    img = (1 - a) * c0 + a * c1 + np.zeros((h, 1, 1), np.float32)
    noise = cv2.resize(rng.normal(0, 18, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32), (w, h))
    img = np.ascontiguousarray(img + noise)
    for _ in range(int(rng.integers(3, 9))):  # clutter the classifier must learn to ignore
        colour = [float(v) for v in rng.uniform(30, 230, 3)]
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            axes = (int(rng.integers(3, w // 6)), int(rng.integers(3, h // 6)))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:
            end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, centre, end, colour, int(rng.integers(1, 4)))
    return img


# ---------------------------------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8 with 0 background, 1..K classes, 255 ignore band
    context: np.ndarray  # (H, W) uint8: id of the class a context pixel co-occurs with, else 0
    classes: list[int]  # present foreground class ids


def _pick_classes(specs: tuple[ClassSpec, ...], cfg: SynthConfig, rng: Rng) -> list[int]:
    names = [s.name for s in specs]
    n = int(rng.choice(np.arange(1, cfg.max_objects + 1), p=_object_count_probs(cfg.max_objects)))
    chosen = [int(rng.integers(len(specs)))]
    partner = CO_OCCURRENCE.get(specs[chosen[0]].name)
    if partner and partner[0] in names and rng.random() < partner[1]:
        chosen.append(names.index(partner[0]))
    while len(chosen) < n:
        chosen.append(int(rng.integers(len(specs))))
    return chosen


def _object_count_probs(n: int) -> np.ndarray:
    p = 0.5 ** np.arange(n)
    return p / p.sum()


def make_scene(specs: tuple[ClassSpec, ...], cfg: SynthConfig, rng: Rng) -> Scene:
    """Draw one scene: background, context bands, then objects back to front (later ones occlude earlier)."""
    h, w = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, 2))
    img = _background(h, w, rng)
    label = np.zeros((h, w), np.uint8)
    context = np.zeros((h, w), np.uint8)
    chosen = _pick_classes(specs, cfg, rng)
    ctx_of = {s.context: k + 1 for k, s in enumerate(specs) if s.context}

    anchors: dict[int, int] = {}  # object index -> bottom row it rests on (its context's upper edge)
    drawn_ctx = set()
    for i, k in enumerate(chosen):
        kind = specs[k].context
        if kind and kind not in drawn_ctx and rng.random() < cfg.p_context:
            anchors[i] = _draw_context(img, context, kind, ctx_of[kind], rng)
            drawn_ctx.add(kind)
    if ctx_of and rng.random() < cfg.p_context_alone:  # a context region without its class: still background
        kind = list(ctx_of)[int(rng.integers(len(ctx_of)))]
        if kind not in drawn_ctx and ctx_of[kind] - 1 not in chosen:
            _draw_context(img, context, kind, ctx_of[kind], rng)

    for i, k in enumerate(chosen):
        _draw_object(img, label, specs[k], k + 1, anchors.get(i), rng)
    context[label > 0] = 0
    label = _ignore_band(label, rng)
    present = sorted(set(np.unique(label[(label > 0) & (label != IGNORE_INDEX)]).tolist()))  # slivers drop out
    return Scene(np.clip(img, 0, 255).astype(np.uint8), label, context, present)


def _draw_context(img: np.ndarray, context: np.ndarray, kind: str, class_id: int, rng: Rng) -> int:
    h, w = context.shape
    top = int(rng.uniform(0.5, 0.72) * h)
    tex, mask = _context_region(kind, h, w, top, rng)
    img[mask] = tex[mask]
    context[mask] = class_id
    return top


def _draw_object(
    img: np.ndarray, label: np.ndarray, spec: ClassSpec, class_id: int, rest_row: int | None, rng: Rng
) -> None:
    """Paste one textured object (clipped at the image border)."""
    h, w = label.shape
    size = rng.uniform(0.28, 0.5) * min(h, w)
    aspect = spec.aspect * rng.uniform(0.85, 1.15)
    bh, bw = max(int(size / np.sqrt(aspect)), 6), max(int(size * np.sqrt(aspect)), 6)
    bh, bw = min(bh, h), min(bw, w)
    x0 = int(rng.integers(-bw // 5, w - bw + bw // 5 + 1))
    if rest_row is None:
        y0 = int(rng.integers(-bh // 5, h - bh + bh // 5 + 1))
    else:  # sit on the context band, slightly sunk into it
        y0 = int(np.clip(rest_row - bh + rng.uniform(0.1, 0.35) * bh, 0, h - bh))
    mask = _shape_mask(spec.shape, bh, bw).astype(bool)
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    tex = _texture(spec.texture, bh, bw, spec.rgb, rng)
    ys, xs = slice(max(y0, 0), min(y0 + bh, h)), slice(max(x0, 0), min(x0 + bw, w))
    sub = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    m = mask[sub]
    img[ys, xs][m] = tex[sub][m]
    label[ys, xs][m] = class_id


def _ignore_band(label: np.ndarray, rng: Rng) -> np.ndarray:
    """Mark a 1-2 px band around every object boundary as 255, like VOC's void outlines."""
    k = np.ones((3, 3), np.uint8) if rng.random() < 0.5 else np.ones((2, 2), np.uint8)
    boundary = cv2.dilate(label, k) != cv2.erode(label, k)
    out = label.copy()
    out[boundary] = IGNORE_INDEX
    return out


# ---------------------------------------------------------------------------------------------------- dataset


def generate_synth(out: str | Path, cfg: SynthConfig = SynthConfig(), progress: bool = True) -> dict:
    """Write the benchmark in VOC layout (see ``write_voc_set``) and return (and save) its statistics
    (``synth_stats.json``: co-occurrence rates and the config)."""
    out = Path(out)
    specs = DEMO_CLASSES if cfg.corpus == "demo" else broad_classes(cfg.seed)
    names = ("background",) + tuple(s.name for s in specs)
    splits = {"train": cfg.n_train, "val": cfg.n_val}
    labels, contexts = write_voc_set(out, names, lambda rng: make_scene(specs, cfg, rng), splits, cfg.seed,
                                     progress, "synth")  # fmt: skip
    stats = cooccurrence_stats(labels, contexts, specs)
    stats["config"] = cfg.__dict__
    (out / "synth_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def write_voc_set(
    out: Path,
    names: tuple[str, ...],
    draw: Callable[[Rng], Scene],
    splits: dict[str, int],
    seed: int,
    progress: bool = True,
    desc: str = "synth",
) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """Draw ``splits[split]`` scenes per split with ``draw`` and write them in PASCAL VOC layout.

    Layout: ``JPEGImages/ID.jpg``, ``SegmentationClass/ID.png`` (VOC palette, 255 ignore band),
    ``ContextMask/ID.png``, ``ImageSets/Segmentation/{split}.txt``, ``classes.txt`` (``names``, background first)
    and ``cls_labels.json`` (id -> class names). Returns the tags and the context ids of every image.
    """
    for sub in ("JPEGImages", "SegmentationClass", "ContextMask", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    labels: dict[str, list[str]] = {}
    contexts: dict[str, list[int]] = {}
    for split_idx, (split, n) in enumerate(splits.items()):
        ids = [f"{split}_{i:06d}" for i in range(n)]
        # One child stream per split: val does not change when n_train changes.
        rng = np.random.default_rng([seed, split_idx])
        for image_id in tqdm(ids, desc=f"{desc} {split}", disable=not progress, leave=False):
            scene = draw(rng)
            cv2.imwrite(
                str(out / "JPEGImages" / f"{image_id}.jpg"), scene.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95]
            )
            save_label_png(out / "SegmentationClass" / f"{image_id}.png", scene.label)
            save_label_png(out / "ContextMask" / f"{image_id}.png", scene.context)
            labels[image_id] = [names[k] for k in scene.classes]
            contexts[image_id] = sorted(set(np.unique(scene.context).tolist()) - {0})
        (out / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    (out / "cls_labels.json").write_text(json.dumps(labels, indent=0))
    return labels, contexts


def cooccurrence_stats(
    labels: dict[str, list[str]],
    contexts: dict[str, list[int]],
    specs: tuple[ClassSpec, ...],
    co_occurrence: dict[str, tuple[str, float]] = CO_OCCURRENCE,
) -> dict:
    """Measured rates: class frequency, P(context | class), P(class | context) and foreground pair co-occurrence.

    ``specs`` need a ``name`` and a ``context`` (None or its kind); ``co_occurrence`` maps b -> (a, P(a | b))."""
    names = [s.name for s in specs]
    present = np.array([[n in labels[i] for n in names] for i in labels], dtype=bool)  # (N, K)
    ctx = np.array([[k + 1 in contexts[i] for k in range(len(names))] for i in labels], dtype=bool)
    n_img = max(len(labels), 1)
    per_class: dict[str, dict] = {}
    for k, spec in enumerate(specs):
        row = {"images": int(present[:, k].sum()), "frequency": float(present[:, k].mean()) if len(labels) else 0.0}
        if spec.context:
            row["context"] = spec.context
            row["p_context_given_class"] = _ratio((present[:, k] & ctx[:, k]).sum(), present[:, k].sum())
            row["p_class_given_context"] = _ratio((present[:, k] & ctx[:, k]).sum(), ctx[:, k].sum())
        per_class[spec.name] = row
    pairs = present.T.astype(np.int64) @ present.astype(np.int64)  # (K, K) joint counts
    top_pairs = sorted(
        ((int(pairs[a, b]), names[a], names[b]) for a in range(len(names)) for b in range(a + 1, len(names))),
        reverse=True,
    )[:5]
    return {
        "images": n_img,
        "per_class": per_class,
        "p_b_given_a": {
            f"{a}|{b}": _ratio(pairs[names.index(a), names.index(b)], pairs[names.index(b), names.index(b)])
            for b, (a, _) in co_occurrence.items()
            if a in names and b in names
        },
        "top_pairs": [{"pair": [a, b], "images": c} for c, a, b in top_pairs],
        "multi_label_share": float((present.sum(1) > 1).mean()) if len(labels) else 0.0,
    }


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")
