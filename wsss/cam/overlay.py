"""Pictures people would rather look at than read: label overlays and titled image | seed | mask | ground-truth
strips with a legend of the classes they show (VOC palette colours, class names), drawn with PIL."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.datasets import Sample
from ..data.palette import IGNORE_INDEX, PALETTE, colorize

MIN_HEIGHT, MAX_HEIGHT = 256, 512  # panels are zoomed (nearest, integer factor) or shrunk into this range
FONT_SIZE, PAD, GAP = 14, 4, 2  # title and legend text size, padding around text, white gap between panels
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the palette colours of ``label`` over ``image`` (background left as is)."""
    colour = colorize(label).astype(np.float32)
    blend = np.where((label > 0)[..., None], (1 - alpha) * image + alpha * colour, image)
    return blend.astype(np.uint8)


def save_overlay(path: Path, sample: Sample, seed: np.ndarray | None, mask: np.ndarray | None,
                 class_names: Sequence[str] | None = None) -> None:  # fmt: skip
    """One titled strip: image | seed | mask | ground truth (each where given) over a legend of the classes any of
    them shows; the folders on the way to ``path`` are created."""
    labels = {"seed": seed, "mask": mask}
    panels = [("image", sample.image)]
    panels += [(title, overlay(sample.image, lab)) for title, lab in labels.items() if lab is not None]
    if sample.mask is not None:
        panels.append(("ground truth", colorize(sample.mask)))
    shown = [lab for lab in (seed, mask, sample.mask) if lab is not None]
    strip = draw_strip(panels, legend_entries(shown, class_names))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)


def legend_entries(labels: Sequence[np.ndarray], class_names: Sequence[str] | None) -> list[tuple[str, tuple]]:
    """(name, RGB) of each class present in any of ``labels`` except the background (left uncoloured in overlays),
    in class order; 255 is named "ignore"."""
    present = np.unique(np.concatenate([np.unique(lab) for lab in labels])) if labels else []
    entries = []
    for value in (int(v) for v in present if v != 0):
        name = "ignore" if value == IGNORE_INDEX else _class_name(value, class_names)
        entries.append((name, tuple(int(c) for c in PALETTE[value])))
    return entries


def _class_name(value: int, class_names: Sequence[str] | None) -> str:
    return class_names[value] if class_names is not None and value < len(class_names) else f"class {value}"


def draw_strip(panels: Sequence[tuple[str, np.ndarray]], legend: Sequence[tuple[str, tuple]]) -> Image.Image:
    """Panels (title, (H, W, 3) uint8) side by side, each under its title, above the legend's swatches."""
    font = _font()
    line = _text_size(font, "Ag")[1] + 2 * PAD
    cells = [_fit(Image.fromarray(np.ascontiguousarray(p))) for _, p in panels]
    widths = [max(c.width, _text_size(font, t)[0] + 2 * PAD) for (t, _), c in zip(panels, cells, strict=True)]
    width = sum(widths) + GAP * (len(cells) - 1)
    height = max(c.height for c in cells)
    rows = _legend_rows(font, legend, width, line)
    canvas = Image.new("RGB", (width, line + height + line * len(rows)), WHITE)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (title, _), cell, w in zip(panels, cells, widths, strict=True):
        draw.text((x + (w - _text_size(font, title)[0]) // 2, PAD), title, fill=BLACK, font=font)
        canvas.paste(cell, (x + (w - cell.width) // 2, line))
        x += w + GAP
    for r, row in enumerate(rows):
        y = line + height + r * line
        for x, name, colour in row:
            draw.rectangle([x, y + PAD, x + line - 2 * PAD, y + line - PAD], fill=colour, outline=BLACK)
            draw.text((x + line - PAD, y + PAD), name, fill=BLACK, font=font)
    return canvas


def _legend_rows(font, legend: Sequence[tuple[str, tuple]], width: int, line: int) -> list[list[tuple]]:
    """Legend entries laid out left to right as (x, name, colour), wrapped at ``width``."""
    rows: list[list[tuple]] = []
    x = width
    for name, colour in legend:
        w = line + _text_size(font, name)[0] + 3 * PAD
        if x + w > width and (x > PAD or not rows):
            rows.append([])
            x = PAD
        rows[-1].append((x, name, colour))
        x += w
    return rows


def _fit(cell: Image.Image) -> Image.Image:
    """Small panels zoomed by an integer factor (nearest: pixels stay legible), large ones shrunk, to a height in
    [MIN_HEIGHT, MAX_HEIGHT]."""
    if cell.height < MIN_HEIGHT:
        zoom = -(-MIN_HEIGHT // cell.height)
        return cell.resize((cell.width * zoom, cell.height * zoom), Image.Resampling.NEAREST)
    if cell.height > MAX_HEIGHT:
        scale = MAX_HEIGHT / cell.height
        return cell.resize((max(1, round(cell.width * scale)), MAX_HEIGHT), Image.Resampling.BOX)
    return cell


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom)
