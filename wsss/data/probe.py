"""A second synthetic co-occurrence set, designed apart from ``synth.py``, used only to *measure* transfer.

The tiny backbones in ``wsss/models/weights/`` were pre-trained on ``synth.py``'s broad corpus, where every class
has a fixed colour; scores on its demo set may therefore reward colour look-up. This generator shares nothing with
that one but the output layout (``synth.write_voc_set``) and the statistics (``synth.cooccurrence_stats``):

* five classes defined by outline (arrow, crescent, heart, hex nut with a hole, lightning bolt) wearing a texture
  drawn at random per instance (flat, gradient, speckle, straight stripes) in random colours, and two classes
  defined by pattern alone (concentric rings, zigzag) on a random smooth blob, also in random colours: no class
  can be told by colour;
* four background models (fractal value noise, tiles or stripes, a clutter of random polygons and fragments of
  class outlines, flat), small images (80-112 px sides), objects of 22-55 % of the short side, rotated, occluding
  one another and sometimes occluded by a background distractor;
* three unlabelled context regions: sand under the nut, a brick wall behind the bolt, foliage around the zigzag
  blob, each with its class most of the time (``p_context``) and sometimes alone (``p_context_alone``); and one
  foreground pair: an arrow comes with most hearts.

Never put it in a pre-training corpus: it exists to test what the demo set cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .palette import IGNORE_INDEX
from .synth import Scene, cooccurrence_stats, write_voc_set

Rng = np.random.Generator


@dataclass(frozen=True)
class ProbeClass:
    """A probe class: an outline (or ``blob`` with a pattern), and the context region it usually comes with."""

    name: str
    outline: str  # arrow, crescent, heart, nut, bolt, blob
    pattern: str | None = None  # rings, zigzag: the class is the pattern (blob outline only)
    context: str | None = None
    spin: float = 180.0  # largest rotation in degrees


PROBE_CLASSES = (
    ProbeClass("arrow", "arrow"),
    ProbeClass("crescent", "crescent", spin=60),
    ProbeClass("heart", "heart", spin=25),
    ProbeClass("nut", "nut", context="sand", spin=30),
    ProbeClass("bolt", "bolt", context="brick", spin=30),
    ProbeClass("rings", "blob", pattern="rings"),
    ProbeClass("zigzag", "blob", pattern="zigzag", context="foliage"),
)
PROBE_CO_OCCURRENCE = {"heart": ("arrow", 0.65)}  # P(arrow | heart) = 0.65
SURFACES = ("flat", "gradient", "speckle", "stripes")  # outline classes' textures, one drawn per instance
BACKGROUNDS = ("noise", "tiles", "clutter", "flat")


@dataclass(frozen=True)
class ProbeConfig:
    """Generator settings; the defaults match the demo's sizes of split."""

    n_train: int = 1000
    n_val: int = 300
    min_size: int = 80
    max_size: int = 112
    seed: int = 0
    p_context: float = 0.8  # P(context | its class)
    p_context_alone: float = 0.1  # P(a context region without its class), per image
    p_occluder: float = 0.25  # P(a background distractor drawn over an object), per object
    p_pair: float = PROBE_CO_OCCURRENCE["heart"][1]  # P(an arrow joins a heart drawn without one); 0: no pair
    max_objects: int = 3
    backgrounds: tuple[str, ...] = BACKGROUNDS  # the background models drawn from, uniformly

    def __post_init__(self):
        object.__setattr__(self, "backgrounds", tuple(self.backgrounds))
        unknown = sorted(set(self.backgrounds) - set(BACKGROUNDS))
        if not self.backgrounds or unknown:
            raise ValueError(f"probe backgrounds must be a non-empty subset of {BACKGROUNDS}, got {self.backgrounds}")


# ---------------------------------------------------------------------------------------------------- outlines
# Every outline is a predicate on centred coordinates u, v in about [-1, 1] (v points down), evaluated on a grid.


def _in_polygon(u: np.ndarray, v: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Even-odd rule over the polygon's edges, vectorised over pixels."""
    inside = np.zeros(u.shape, bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, 0), strict=True):
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (u < x_at)
    return inside


ARROW = np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.62], [1, 0], [0.15, 0.62], [0.15, 0.22], [-1, 0.22]])
BOLT = np.array([[0.25, -1], [-0.55, 0.12], [-0.02, 0.12], [-0.3, 1], [0.6, -0.25], [0.08, -0.25], [0.45, -1]])


def _outline(name: str, u: np.ndarray, v: np.ndarray, rng: Rng) -> np.ndarray:
    if name == "arrow":
        return _in_polygon(u, v, ARROW)
    if name == "bolt":
        return _in_polygon(u, v, BOLT)
    if name == "crescent":
        shift = rng.uniform(0.35, 0.55)
        return (u**2 + v**2 <= 0.95) & ((u - shift) ** 2 + (v + 0.1) ** 2 > 0.75 * rng.uniform(0.85, 1.1))
    if name == "heart":
        x, y = u * 1.25, -(v * 1.25 - 0.25)
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if name == "nut":
        hexagon = np.maximum(np.abs(v), np.abs(u) * 0.866 + np.abs(v) * 0.5) <= 0.9
        return hexagon & (u**2 + v**2 > rng.uniform(0.14, 0.25))
    if name == "blob":  # star-convex, radius 1 perturbed by a few random harmonics
        theta, r = np.arctan2(v, u), np.hypot(u, v)
        radius = 0.8 + np.zeros_like(theta)
        for f in rng.choice([2, 3, 4, 5], 2, replace=False):
            radius += rng.uniform(0.06, 0.16) * np.cos(f * theta + rng.uniform(0, 2 * np.pi))
        return r <= radius
    raise ValueError(f"unknown outline {name!r}")


def outline_mask(name: str, bh: int, bw: int, angle: float, rng: Rng) -> np.ndarray:
    """A (bh, bw) bool mask of outline ``name`` rotated by ``angle`` degrees, filling its box."""
    v, u = np.mgrid[0:bh, 0:bw].astype(np.float32)
    u, v = (u + 0.5) / bw * 2 - 1, (v + 0.5) / bh * 2 - 1
    a = np.deg2rad(angle)
    ur, vr = u * np.cos(a) + v * np.sin(a), -u * np.sin(a) + v * np.cos(a)
    return _outline(name, ur, vr, rng)


# ---------------------------------------------------------------------------------------------------- colours


def random_colours(rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours (float32) of random hues whose brightness differs by at least a third of the range."""
    value = rng.uniform(0.15, 1.0)
    other = value + rng.choice([-1, 1]) * rng.uniform(0.35, 0.6)
    other = other if 0.1 <= other <= 1.0 else value - np.sign(other - value) * rng.uniform(0.35, 0.6)
    hsv = np.array([[rng.uniform(0, 180), rng.uniform(80, 255), 255 * value],
                    [rng.uniform(0, 180), rng.uniform(60, 255), 255 * np.clip(other, 0.08, 1.0)]])  # fmt: skip
    rgb = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0].astype(np.float32)
    return rgb[0], rgb[1]


def _mix(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return t[..., None] * a + (1 - t[..., None]) * b


def _wave_coords(h: int, w: int, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by a random angle: along and across a random direction."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    return xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)


def surface(kind: str, h: int, w: int, rng: Rng, centre: tuple[float, float] | None = None) -> np.ndarray:
    """An (h, w, 3) float32 texture in random colours: an outline class's surface or a class-defining pattern
    (``rings`` are centred on ``centre``, (y, x), by default the middle)."""
    a, b = random_colours(rng)
    along, across = _wave_coords(h, w, rng)
    period = rng.uniform(5, 8)
    if kind == "flat":
        t = np.ones((h, w), np.float32) * rng.uniform(0.8, 1.0)
    elif kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    elif kind == "speckle":
        t = (rng.random((h, w)) > rng.uniform(0.15, 0.3)).astype(np.float32)
    elif kind == "stripes":
        t = ((across / period) % 1 < 0.5).astype(np.float32)
    elif kind == "rings":
        cy, cx = centre if centre is not None else (h / 2, w / 2)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = ((np.hypot(yy - cy, xx - cx) / period + rng.uniform(0, 1)) % 1 < 0.5).astype(np.float32)
    elif kind == "zigzag":
        tooth = rng.uniform(5, 8)
        tri = np.abs((along / tooth) % 2 - 1) * tooth * rng.uniform(0.7, 1.1)  # triangle wave
        t = (((across + tri) / period) % 1 < 0.5).astype(np.float32)
    else:
        raise ValueError(f"unknown surface {kind!r}")
    return _mix(t, a, b) + rng.normal(0, 7, (h, w, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- backgrounds


def value_noise(h: int, w: int, rng: Rng, octaves: int = 4) -> np.ndarray:
    """Fractal value noise in [0, 1]: random grids upsampled bicubically, halving amplitude per octave."""
    total = np.zeros((h, w), np.float32)
    for o in range(octaves):
        cells = 2 ** (o + 1) + 1
        grid = rng.random((cells, cells)).astype(np.float32)
        total += 0.5**o * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def background(kind: str, h: int, w: int, rng: Rng) -> np.ndarray:
    a, b = random_colours(rng)
    if kind == "noise":
        img = _mix(value_noise(h, w, rng), a, b)
    elif kind == "tiles":
        along, across = _wave_coords(h, w, rng)
        size = rng.uniform(6, 16)
        stripes = (across / size) % 1 < 0.5
        t = stripes if rng.random() < 0.5 else ((along // size) + (across // size)) % 2 == 0  # or tiles
        img = _mix(t.astype(np.float32) * 0.6 + 0.2, a, b)
    elif kind == "clutter":
        img = _mix(value_noise(h, w, rng, 2) * 0.4 + 0.3, a, b)
        _clutter(img, int(rng.integers(4, 10)), rng)
    elif kind == "flat":
        img = np.broadcast_to(a, (h, w, 3)).copy()
    else:
        raise ValueError(f"unknown background {kind!r}; choose from {BACKGROUNDS}")
    return img.astype(np.float32) + rng.normal(0, 5, (h, w, 3)).astype(np.float32)


def _clutter(img: np.ndarray, n: int, rng: Rng) -> None:
    """Random polygons and fragments of class outlines (cut by a random half-plane), in place."""
    for _ in range(n):
        mask = distractor(img.shape[0], img.shape[1], rng)
        img[mask] = surface(SURFACES[int(rng.integers(len(SURFACES)))], *img.shape[:2], rng)[mask]


def distractor(h: int, w: int, rng: Rng) -> np.ndarray:
    """An (h, w) mask: a random polygon, or at most ~half of an outline-class shape."""
    side = int(rng.uniform(0.12, 0.35) * min(h, w))
    y0, x0 = int(rng.integers(-side // 3, h - side // 2)), int(rng.integers(-side // 3, w - side // 2))
    box = np.zeros((h, w), bool)
    if rng.random() < 0.5:
        n = int(rng.integers(3, 7))
        theta = np.sort(rng.uniform(0, 2 * np.pi, n))
        pts = np.stack([np.cos(theta), np.sin(theta)], 1) * rng.uniform(0.4, 1, (n, 1))
        v, u = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1) * 2 - 1
        shape = _in_polygon(u, v, pts)
    else:
        outline = ("arrow", "crescent", "heart", "nut", "bolt")[int(rng.integers(5))]
        shape = outline_mask(outline, side, side, rng.uniform(0, 360), rng)
        v, u = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1) * 2 - 1
        a = rng.uniform(0, 2 * np.pi)
        shape &= u * np.cos(a) + v * np.sin(a) > rng.uniform(0.0, 0.3)  # keep one side of a line through it
    _paste(box, shape, y0, x0)
    return box


def _paste(canvas: np.ndarray, mask: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """Set ``canvas`` True under ``mask`` placed at (y0, x0), clipped at the border; returns the placed mask."""
    h, w = canvas.shape
    bh, bw = mask.shape
    ys, xs = slice(max(y0, 0), min(y0 + bh, h)), slice(max(x0, 0), min(x0 + bw, w))
    placed = np.zeros((h, w), bool)
    if ys.start < ys.stop and xs.start < xs.stop:
        placed[ys, xs] = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    canvas |= placed
    return placed


# ---------------------------------------------------------------------------------------------------- contexts


def context_region(kind: str, h: int, w: int, box: tuple[int, int, int, int], rng: Rng) -> tuple[np.ndarray, ...]:
    """Texture (h, w, 3) and mask (h, w) of a context region for an object in ``box`` (y0, x0, bh, bw)."""
    y0, x0, bh, bw = box
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "sand":  # a ground band the object rests on
        top = np.clip(y0 + bh * rng.uniform(0.7, 0.9), 0.35 * h, 0.9 * h)
        mask = yy >= top + rng.uniform(1, 3) * np.sin(xx * rng.uniform(0.05, 0.15) + rng.uniform(0, 6.3))
        grain = value_noise(h, w, rng, 3) * 0.5 + rng.random((h, w)).astype(np.float32) * 0.5
        ripples = 0.5 + 0.5 * np.sin(yy * rng.uniform(0.6, 1.0) + 3 * value_noise(h, w, rng, 2))
        tone = (0.55 + 0.3 * grain + 0.15 * ripples)[..., None]
        img = tone * np.array([222, 190, 130], np.float32) * rng.uniform(0.85, 1.1)
    elif kind == "brick":  # a wall behind the object, larger than it
        gy, gx = bh * rng.uniform(0.4, 0.9), bw * rng.uniform(0.4, 0.9)
        mask = (yy >= y0 - gy) & (yy < y0 + bh + gy * 0.5) & (xx >= x0 - gx) & (xx < x0 + bw + gx)
        course, length = rng.uniform(4, 6), rng.uniform(8, 12)
        row = np.floor(yy / course)
        mortar = ((yy % course) < 1.0) | (((xx + (row % 2) * length / 2) % length) < 1.0)
        shade = 0.8 + 0.4 * rng.random((int(row.max()) + 2, int(w / length) + 3)).astype(np.float32)
        brick = shade[row.astype(int), ((xx + (row % 2) * length / 2) // length).astype(int)][..., None]
        img = np.where(mortar[..., None], [185, 180, 170], brick * np.array([150, 60, 40], np.float32))
    elif kind == "foliage":  # leaves around the object
        cy, cx = y0 + bh / 2, x0 + bw / 2
        reach = rng.uniform(0.75, 1.1) * np.hypot(bh, bw)
        mask = np.hypot((yy - cy), (xx - cx)) / reach + 0.45 * value_noise(h, w, rng, 3) < 0.95
        spots = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), rng.uniform(1.0, 1.6))
        leaf = (spots > 0).astype(np.float32) * (0.6 + 0.4 * value_noise(h, w, rng, 3))
        img = np.stack([25 + 45 * leaf, 60 + 120 * leaf, 20 + 40 * leaf], -1)
    else:
        raise ValueError(f"unknown context {kind!r}")
    return img.astype(np.float32) + rng.normal(0, 6, (h, w, 3)).astype(np.float32), mask


# ---------------------------------------------------------------------------------------------------- scenes


def _pick(cfg: ProbeConfig, rng: Rng) -> list[int]:
    names = [c.name for c in PROBE_CLASSES]
    n = int(rng.integers(1, cfg.max_objects + 1)) if rng.random() < 0.6 else 1
    chosen = [int(v) for v in rng.integers(len(names), size=n)]
    for b, (a, _) in PROBE_CO_OCCURRENCE.items():  # the draw happens at any p_pair: the stream stays the same
        if names.index(b) in chosen and names.index(a) not in chosen and rng.random() < cfg.p_pair:
            chosen.append(names.index(a))
    return chosen


def _place(cls: ProbeClass, h: int, w: int, rng: Rng) -> tuple[int, int, int, int]:
    """A box (y0, x0, bh, bw) of random scale and aspect, up to a fifth outside the image."""
    side = rng.uniform(0.22, 0.55) * min(h, w)
    aspect = rng.uniform(0.8, 1.25)
    bh, bw = max(int(side / np.sqrt(aspect)), 8), max(int(side * np.sqrt(aspect)), 8)
    y0 = int(rng.integers(-bh // 5, h - bh + bh // 5 + 1))
    x0 = int(rng.integers(-bw // 5, w - bw + bw // 5 + 1))
    if cls.context == "sand":  # stand in the lower half, where the ground is
        y0 = int(rng.integers(max(h // 2 - bh // 2, 0), max(h - bh, h // 2 - bh // 2) + 1))
    return y0, x0, bh, bw


def make_probe_scene(cfg: ProbeConfig, rng: Rng) -> Scene:
    """One scene: background, context regions, objects back to front, occluders; then the ignore band."""
    h, w = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, 2))
    img = background(cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))], h, w, rng)
    label = np.zeros((h, w), np.uint8)
    context = np.zeros((h, w), np.uint8)
    chosen = _pick(cfg, rng)
    boxes = [_place(PROBE_CLASSES[k], h, w, rng) for k in chosen]
    ctx_of = {c.context: k + 1 for k, c in enumerate(PROBE_CLASSES) if c.context}

    drawn = set()
    for k, box in zip(chosen, boxes, strict=True):
        kind = PROBE_CLASSES[k].context
        if kind and kind not in drawn and rng.random() < cfg.p_context:
            _draw_context(img, context, kind, ctx_of[kind], box, rng)
            drawn.add(kind)
    if rng.random() < cfg.p_context_alone:  # a context region without its class: background all the same
        kind = list(ctx_of)[int(rng.integers(len(ctx_of)))]
        if kind not in drawn and ctx_of[kind] - 1 not in chosen:
            _draw_context(img, context, kind, ctx_of[kind], _place(PROBE_CLASSES[ctx_of[kind] - 1], h, w, rng), rng)

    for k, box in zip(chosen, boxes, strict=True):
        _draw_object(img, label, PROBE_CLASSES[k], k + 1, box, rng)
        if rng.random() < cfg.p_occluder:
            occluder = distractor(h, w, rng) & (label > 0)
            img[occluder] = surface(SURFACES[int(rng.integers(len(SURFACES)))], h, w, rng)[occluder]
            label[occluder] = 0
    context[label > 0] = 0
    label = ignore_band(label, 1 if rng.random() < 0.75 else 2)
    present = sorted(set(np.unique(label[(label > 0) & (label != IGNORE_INDEX)]).tolist()))
    return Scene(np.clip(img, 0, 255).astype(np.uint8), label, context, present)


def _draw_context(img, context, kind: str, class_id: int, box, rng: Rng) -> None:
    tex, mask = context_region(kind, *context.shape, box, rng)
    img[mask] = tex[mask]
    context[mask] = class_id


def _draw_object(img: np.ndarray, label: np.ndarray, cls: ProbeClass, class_id: int, box, rng: Rng) -> None:
    y0, x0, bh, bw = box
    shape = outline_mask(cls.outline, bh, bw, rng.uniform(-cls.spin, cls.spin), rng)
    if rng.random() < 0.5:
        shape = shape[:, ::-1]
    placed = _paste(np.zeros(label.shape, bool), shape, y0, x0)
    kind = cls.pattern or SURFACES[int(rng.integers(len(SURFACES)))]
    centre = (y0 + bh * rng.uniform(0.35, 0.65), x0 + bw * rng.uniform(0.35, 0.65))
    img[placed] = surface(kind, *label.shape, rng, centre)[placed]
    label[placed] = class_id


def ignore_band(label: np.ndarray, radius: int) -> np.ndarray:
    """255 on pixels within ``radius`` of a change of class (objects' outlines), like VOC's void outlines."""
    size = 2 * radius + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    edge = cv2.morphologyEx(label, cv2.MORPH_GRADIENT, kernel) > 0
    return np.where(edge, IGNORE_INDEX, label).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- dataset


def generate_probe(out: str | Path, cfg: ProbeConfig = ProbeConfig(), progress: bool = True) -> dict:
    """Write the probe set in the VOC layout of ``synth.write_voc_set`` and return (and save, as
    ``probe_stats.json``) its co-occurrence statistics and config."""
    out = Path(out)
    names = ("background",) + tuple(c.name for c in PROBE_CLASSES)
    splits = {"train": cfg.n_train, "val": cfg.n_val}
    labels, contexts = write_voc_set(out, names, lambda rng: make_probe_scene(cfg, rng), splits, cfg.seed,
                                     progress, "probe")  # fmt: skip
    stats = cooccurrence_stats(labels, contexts, PROBE_CLASSES, PROBE_CO_OCCURRENCE)
    stats["config"] = {**cfg.__dict__, "backgrounds": list(cfg.backgrounds)}
    stats["generator"] = "probe"
    (out / "probe_stats.json").write_text(json.dumps(stats, indent=2))
    return stats
