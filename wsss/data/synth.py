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
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .palette import IGNORE_INDEX, save_label_png

Rng = np.random.Generator


@dataclass(frozen=True)
class ClassSpec:
    """A synthetic foreground class: a shape, a texture, a colour and an optional context region.

    ``family`` "fixed" (demo, broad) draws every instance with ``shape``, ``texture`` and ``rgb``. The broad2 families
    draw fresh colours per instance (``rgb`` None): "shape" (fixed ``shape``, texture "any": a nuisance texture per
    instance), "texture" (fixed ``texture``, shape "any": a fresh random outline per instance) and "shape+texture".
    ``shape`` "outline" means the polygon ``outline`` (points in the unit square).
    """

    name: str
    shape: str
    texture: str
    rgb: tuple[int, int, int] | None
    context: str | None = None  # context region drawn with this class most of the time
    aspect: float = 1.0  # width / height of the bounding box
    family: str = "fixed"
    outline: tuple[tuple[float, float], ...] | None = None


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
    corpus: str = "demo"  # "demo": DEMO_CLASSES; "broad": 24 random classes; "broad2": broad2_classes (pre-training)


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


def corpus_classes(cfg: SynthConfig) -> tuple[ClassSpec, ...]:
    """The classes of ``cfg.corpus``."""
    if cfg.corpus == "demo":
        return DEMO_CLASSES
    if cfg.corpus == "broad":
        return broad_classes(cfg.seed)
    if cfg.corpus == "broad2":
        return broad2_classes(cfg.seed)
    raise ValueError(f"unknown synthetic corpus {cfg.corpus!r}; choose from {CORPORA}")


# ---------------------------------------------------------------------------------------------------- broad2
# A pre-training corpus that rewards shape and texture, not colour (issue 20): every instance draws its own colours.
# The three texture pools are disjoint and texture-class outlines are fresh per instance, so no instance fits two
# classes: a shape class wears a NUISANCE texture, a texture class a PATTERN, a shape+texture class a COMBO texture
# on one of two outlines that each carry every COMBO texture (neither cue alone names it).

CORPORA = ("demo", "broad", "broad2")
# No "rings" or "zigzag": those are two of the probe set's classes (wsss/data/probe.py), which must stay unseen.
PATTERNS = ("stripes_fine", "stripes_coarse", "checker_fine", "checker_coarse", "dots_fine", "dots_coarse", "hatch",
            "waves", "speckle", "bricks")  # fmt: skip
COMBO_TEXTURES = ("windows", "blotches", "gradient")  # the demo's textures (base colour and its dark shade)
NUISANCE_TEXTURES = ("plain", "ramp", "soft", "split")
OUTLINE_KINDS = ("star", "blob", "concave", "convex")
BACKGROUNDS = ("clutter", "value_noise", "tiles", "flat", "fragments")


def broad2_classes(seed: int, n_shape: int = 18, n_combo_outlines: int = 2) -> tuple[ClassSpec, ...]:
    """Shape classes (6 of SHAPES, the rest random outlines), one texture class per PATTERN, shape+texture classes.

    Water, rails and grass go with the first class of each family."""
    rng = np.random.default_rng([seed, 2])
    named = [str(v) for v in rng.permutation([s for s in SHAPES if s not in ("ellipse", "rect")])[:6]]
    specs = [ClassSpec(f"shape-{n}-{i}", n, "any", None, aspect=float(rng.uniform(0.5, 2.0)), family="shape")
             for i, n in enumerate(named)]  # fmt: skip
    for i in range(len(named), n_shape):
        kind = OUTLINE_KINDS[i % len(OUTLINE_KINDS)]
        points, aspect = _random_outline(kind, rng)
        specs.append(ClassSpec(f"shape-{kind}-{i}", "outline", "any", None, aspect=aspect, family="shape",
                               outline=_as_tuple(points)))  # fmt: skip
    specs += [ClassSpec(f"texture-{p}", "any", p, None, family="texture") for p in PATTERNS]
    for j in range(n_combo_outlines):
        kind = OUTLINE_KINDS[int(rng.integers(len(OUTLINE_KINDS)))]
        points, aspect = _random_outline(kind, rng)
        specs += [ClassSpec(f"combo-{kind}{j}-{t}", "outline", t, None, aspect=aspect, family="shape+texture",
                            outline=_as_tuple(points)) for t in COMBO_TEXTURES]  # fmt: skip
    firsts = {f: next(k for k, s in enumerate(specs) if s.family == f) for f in ("shape", "texture", "shape+texture")}
    for kind, k in zip(CONTEXTS, firsts.values(), strict=True):
        specs[k] = replace(specs[k], context=kind)
    return tuple(specs)


def _as_tuple(points: np.ndarray) -> tuple[tuple[float, float], ...]:
    return tuple((round(float(x), 4), round(float(y), 4)) for x, y in points)


def _random_outline(kind: str, rng: Rng) -> tuple[np.ndarray, float]:
    """A random closed polygon of ``kind`` scaled to fill the unit square, and its natural width / height."""
    if kind == "star":
        n = int(rng.integers(4, 10))
        t = np.arange(2 * n) * np.pi / n + rng.normal(0, 0.08, 2 * n)
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.3, 0.65)) * rng.uniform(0.85, 1.15, 2 * n)
    elif kind == "blob":  # a Fourier radius: r(t) = 1 + sum_k a_k cos(k t + phi_k)
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        k = np.arange(2, 6)[:, None]
        amp = rng.uniform(0, 0.35, (4, 1)) / np.sqrt(k - 1)
        r = np.maximum(1 + (amp * np.cos(k * t + rng.uniform(0, 2 * np.pi, (4, 1)))).sum(0), 0.25)
    elif kind == "concave":
        n = int(rng.integers(5, 11))
        t, r = np.sort(rng.uniform(0, 2 * np.pi, n)), rng.uniform(0.35, 1.0, n)
    elif kind == "convex":
        cloud = rng.uniform(-1, 1, (int(rng.integers(5, 12)), 2)).astype(np.float32)
        hull = cv2.convexHull(cloud)[:, 0].astype(np.float64)
        t, r = np.arctan2(hull[:, 1], hull[:, 0]), np.hypot(hull[:, 0], hull[:, 1])
    else:
        raise ValueError(f"unknown outline kind {kind!r}; choose from {OUTLINE_KINDS}")
    points = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    lo, extent = points.min(0), np.maximum(np.ptp(points, 0), 1e-6)
    return (points - lo) / extent, float(np.clip(extent[0] / extent[1], 0.4, 2.5))


def _instance_colours(rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours at least 90 apart per channel when drawn too close; grey pairs one time in seven."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if rng.random() < 1 / 7:
        c0, c1 = np.full(3, c0.mean()), np.full(3, c1.mean())
    if np.abs(c0 - c1).max() < 90:
        c1 = np.where(c0 < 128, c0 + 110, c0 - 110)
    return c0.astype(np.float32), c1.astype(np.float32)


def _pattern(name: str, h: int, w: int, c0: np.ndarray, c1: np.ndarray, rng: Rng) -> np.ndarray:
    """An (h, w, 3) float32 two-colour PATTERN or NUISANCE texture, at a random angle and phase."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u, v = xx * np.cos(a) + yy * np.sin(a), yy * np.cos(a) - xx * np.sin(a)
    fine, coarse, phase = rng.uniform(3, 5), rng.uniform(8, 12), rng.uniform(0, 12)
    if name in ("stripes_fine", "stripes_coarse"):
        p = fine if name == "stripes_fine" else coarse
        t = (u + phase) % p < p / 2
    elif name in ("checker_fine", "checker_coarse"):
        p = fine if name == "checker_fine" else coarse
        t = ((u + phase) // p + (v + phase) // p) % 2
    elif name in ("dots_fine", "dots_coarse"):
        p = fine + 1.5 if name == "dots_fine" else coarse + 1.5
        t = ((u + phase) % p - p / 2) ** 2 + ((v + phase) % p - p / 2) ** 2 < (p / 3.2) ** 2
    elif name == "hatch":
        p = rng.uniform(5, 8)
        t = ((u + phase) % p < 1.4) | ((v + phase) % p < 1.4)
    elif name == "waves":
        p, q = rng.uniform(5, 8), rng.uniform(6, 10)
        t = (u + phase + p * (0.5 + 0.5 * np.sin(v * np.pi / q))) % p < p / 2
    elif name == "speckle":
        cell = int(rng.integers(1, 3))
        t = cv2.resize(rng.random((h // cell + 1, w // cell + 1)), (w, h), interpolation=cv2.INTER_NEAREST) < 0.5
    elif name == "bricks":
        p = rng.uniform(4, 7)
        row = (yy + phase) // p
        t = ~(((yy + phase) % p < 1.2) | ((xx + phase + (row % 2) * p) % (2 * p) < 1.2))
    elif name == "plain":
        t = np.ones((h, w), np.float32)
    elif name == "ramp":
        t = (u - u.min()) / max(float(np.ptp(u)), 1.0)
    elif name == "soft":
        noise = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), rng.uniform(3, 8))
        t = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6)
    elif name == "split":
        t = u > rng.uniform(u.min(), u.max())
    else:
        raise ValueError(f"unknown texture {name!r}; choose from {PATTERNS + NUISANCE_TEXTURES}")
    t = t.astype(np.float32)[..., None]
    return t * c0 + (1 - t) * c1 + rng.normal(0, 6, (h, w, 3)).astype(np.float32)


def _instance_texture(texture: str, h: int, w: int, rng: Rng) -> np.ndarray:
    """``texture`` ("any": a random NUISANCE texture) in fresh random colours."""
    c0, c1 = _instance_colours(rng)
    if texture == "any":
        texture = NUISANCE_TEXTURES[int(rng.integers(len(NUISANCE_TEXTURES)))]
    if texture in TEXTURES:
        return _texture(texture, h, w, (int(c0[0]), int(c0[1]), int(c0[2])), rng)
    return _pattern(texture, h, w, c0, c1, rng)


def _instance_mask(spec: ClassSpec, size: float, rng: Rng) -> np.ndarray:
    """A flipped and rotated boolean mask of one instance of ``spec``, in a square box of side ~ size * sqrt(2)."""
    if spec.shape == "any":  # a fresh outline; one time in five a plain ellipse or rectangle
        shape = ("ellipse", "rect")[int(rng.integers(2))] if rng.random() < 0.2 else "outline"
        points, aspect = _random_outline(OUTLINE_KINDS[int(rng.integers(len(OUTLINE_KINDS)))], rng)
    else:
        shape, points, aspect = spec.shape, np.array(spec.outline or [], np.float64), spec.aspect
    aspect *= rng.uniform(0.8, 1.25)
    bh, bw = max(int(size / np.sqrt(aspect)), 5), max(int(size * np.sqrt(aspect)), 5)
    side = int(np.ceil(np.hypot(bh, bw))) + 2
    mask = np.zeros((side, side), np.uint8)
    y0, x0 = (side - bh) // 2, (side - bw) // 2
    mask[y0 : y0 + bh, x0 : x0 + bw] = _poly(points, bh, bw) if shape == "outline" else _shape_mask(shape, bh, bw)
    if rng.random() < 0.5:
        mask = np.ascontiguousarray(mask[:, ::-1])
    angle = rng.uniform(-180, 180) if rng.random() < 0.5 else rng.uniform(-25, 25)
    rot = cv2.getRotationMatrix2D((side / 2 - 0.5, side / 2 - 0.5), float(angle), 1.0)
    return cv2.warpAffine(mask, rot, (side, side), flags=cv2.INTER_NEAREST).astype(bool)


def _draw_free_object(img: np.ndarray, label: np.ndarray, spec: ClassSpec, class_id: int, rest_row: int | None,
                      rng: Rng) -> None:  # fmt: skip
    """Paste one broad2 instance: its scale log-uniform in 0.28..0.7 of the short side, any angle, fresh colours."""
    h, w = label.shape
    mask = _instance_mask(spec, float(np.exp(rng.uniform(np.log(0.28), np.log(0.7)))) * min(h, w), rng)
    rows = np.flatnonzero(mask.any(1))
    side = mask.shape[0]
    x0 = int(rng.integers(-side // 3, max(w - side + side // 3, -side // 3) + 1))
    if rest_row is None:
        y0 = int(rng.integers(-side // 3, max(h - side + side // 3, -side // 3) + 1))
    else:  # the lowest mask row sinks a little into the context band
        y0 = int(rest_row - rows[-1] + rng.uniform(0.1, 0.35) * (rows[-1] - rows[0] + 1))
    _paste(img, label, mask, _instance_texture(spec.texture, side, side, rng), y0, x0, class_id)


def _background2(h: int, w: int, specs: tuple[ClassSpec, ...], rng: Rng) -> np.ndarray:
    """One of BACKGROUNDS: the demo's gradient and clutter, value noise, broad stripes or tiles, a flat colour, or
    a flat / noisy ground strewn with fragments of the classes' outlines (half an outline is not the class)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if kind == "clutter":
        return _background(h, w, rng)
    img = np.zeros((h, w, 3), np.float32) + rng.uniform(20, 235, 3).astype(np.float32)
    if kind in ("value_noise", "fragments"):
        for cell, amp in ((32, 40), (16, 25), (8, 15), (4, 8)):
            grid = rng.uniform(-amp, amp, (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
            img += cv2.resize(grid, (w + cell, h + cell), interpolation=cv2.INTER_CUBIC)[:h, :w]
    if kind == "tiles":
        c1 = np.clip(img[0, 0] + rng.choice([-1, 1], 3) * rng.uniform(20, 50, 3), 0, 255).astype(np.float32)
        name = ("stripes_coarse", "checker_coarse")[int(rng.integers(2))]
        img = _pattern(name, h // 3 + 1, w // 3 + 1, img[0, 0], c1, rng)  # drawn at 1/3 scale: periods 24-36 px
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == "fragments":
        outlined = [s for s in specs if s.shape != "any"]
        for _ in range(int(rng.integers(2, 6))):
            _draw_fragment(img, outlined[int(rng.integers(len(outlined)))], rng)
    return img + rng.normal(0, 4, (h, w, 3)).astype(np.float32)


def _draw_fragment(img: np.ndarray, spec: ClassSpec, rng: Rng) -> None:
    """About half of an instance of ``spec``, cut along a random line through it, in a nuisance texture."""
    h, w = img.shape[:2]
    mask = _instance_mask(spec, rng.uniform(0.2, 0.5) * min(h, w), rng)
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return
    a = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    mask &= (xx - xs.mean()) * np.cos(a) + (yy - ys.mean()) * np.sin(a) > 0
    side = mask.shape[0]
    y0, x0 = int(rng.integers(-side // 3, h - side // 3)), int(rng.integers(-side // 3, w - side // 3))
    _paste(img, np.zeros((h, w), np.uint8), mask, _instance_texture("any", side, side, rng), y0, x0, 0)


def _occlude(img: np.ndarray, label: np.ndarray, context: np.ndarray, rng: Rng) -> None:
    """With probability 0.3, one or two small random nuisance shapes in front of everything (background)."""
    if rng.random() >= 0.3:
        return
    h, w = label.shape
    occluder = ClassSpec("occluder", "any", "any", None, family="occluder")
    for _ in range(int(rng.integers(1, 3))):
        covered = np.zeros((h, w), np.uint8)
        mask = _instance_mask(occluder, rng.uniform(0.12, 0.3) * min(h, w), rng)
        side = mask.shape[0]
        y0, x0 = int(rng.integers(-side // 3, h - side // 3)), int(rng.integers(-side // 3, w - side // 3))
        _paste(img, covered, mask, _instance_texture("any", side, side, rng), y0, x0, 1)
        label[covered > 0] = 0
        context[covered > 0] = 0


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
    img = _background2(h, w, specs, rng) if cfg.corpus == "broad2" else _background(h, w, rng)
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
    if cfg.corpus == "broad2":
        _occlude(img, label, context, rng)
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
    if spec.family != "fixed":
        return _draw_free_object(img, label, spec, class_id, rest_row, rng)
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
    _paste(img, label, mask, _texture(spec.texture, bh, bw, spec.rgb, rng), y0, x0, class_id)


def _paste(img: np.ndarray, label: np.ndarray, mask: np.ndarray, tex: np.ndarray, y0: int, x0: int,
           class_id: int) -> None:  # fmt: skip
    """Copy ``tex`` under the boolean ``mask`` into ``img`` at (y0, x0), clipped at the border; label it."""
    h, w = label.shape
    ys, xs = slice(max(y0, 0), min(y0 + mask.shape[0], h)), slice(max(x0, 0), min(x0 + mask.shape[1], w))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
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
    specs = corpus_classes(cfg)
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
