"""The one image decoder of the package: any common file -> (H, W, 3) uint8 RGB, with clear errors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default warning threshold

# Leading bytes of the formats we read: a file that starts like one but fails to open is corrupt, not foreign.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")

# What Pillow raises on broken streams: truncation, bad chunks/CRCs, bad zlib data, short reads.
_CORRUPT_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error, IndexError)


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the file and the reason."""


def decode_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file or encoded bytes to a C-contiguous (H, W, 3) uint8 RGB array.

    EXIF orientation is applied. Grey, 16/32-bit, float, palette, CMYK and YCbCr images are converted to RGB;
    an alpha channel is dropped (colour kept as stored, as ``cv2.imread`` does), not composited.
    Truncation is detected as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default (False).

    Args:
        source: Path to an image file, or the encoded file contents.
        max_pixels: Largest accepted width * height, checked from the header before any pixel is decoded.
            Pillow's own bomb limit (2 * ``Image.MAX_IMAGE_PIXELS``) also applies.

    Raises:
        ImageDecodeError: File missing or empty, not an image, truncated or corrupt, or too many pixels.
    """
    name, fp = _open_source(source)
    try:
        img = _open_image(fp, name)
    except BaseException:
        fp.close()
        raise
    with img, fp:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError(f"{name}: corrupt image (size {w}x{h})")
        if w * h > max_pixels:
            raise ImageDecodeError(
                f"{name}: image has {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} "
                "(refusing a possible decompression bomb)"
            )
        try:
            img.load()
        except _CORRUPT_ERRORS as e:
            raise ImageDecodeError(f"{name}: truncated or corrupt image data ({e})") from e
        img = _apply_exif(img)
        return _to_rgb(img, name)


def _open_source(source: str | Path | bytes) -> tuple[str, io.BufferedIOBase]:
    """Validate the source and return (display name, readable binary stream)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("<bytes>: empty file (0 bytes)")
        return "<bytes>", io.BytesIO(bytes(source))
    path = Path(source)
    if not path.exists():
        raise ImageDecodeError(f"{path}: file not found")
    if not path.is_file():
        raise ImageDecodeError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{path}: empty file (0 bytes)")
    try:
        return str(path), path.open("rb")
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot open ({e.strerror or e})") from e


def _open_image(fp: io.BufferedIOBase, name: str) -> Image.Image:
    """Read the header only (Pillow decodes lazily)."""
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: too many pixels for Pillow's decompression-bomb limit ({e})") from e
    except UnidentifiedImageError as e:
        fp.seek(0)
        head = fp.read(16)
        if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            raise ImageDecodeError(f"{name}: truncated or corrupt image header") from e
        raise ImageDecodeError(f"{name}: not a recognised image format") from e
    except _CORRUPT_ERRORS as e:
        raise ImageDecodeError(f"{name}: truncated or corrupt image header ({e})") from e


def _apply_exif(img: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF orientation tag; a malformed EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except (*_CORRUPT_ERRORS, TypeError, KeyError):
        return img


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Convert any Pillow mode to an (H, W, 3) uint8 RGB array."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _high_depth_to_uint8(np.asarray(img), mode)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode != "RGB":
        # Alpha-bearing and transparent-palette images go through RGBA so no Pillow warning fires; alpha is dropped.
        has_alpha = "A" in mode or "a" in mode or "transparency" in img.info
        try:
            img = img.convert("RGBA" if has_alpha else "RGB")
        except ValueError as e:
            raise ImageDecodeError(f"{name}: cannot convert image mode {mode!r} to RGB ({e})") from e
    arr = np.array(img)  # a writable copy: consumers such as pydensecrf need one
    return np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8)


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer or float grey data to uint8 (keeps the top bits; no clipping of the range).

    Mode "I" holds 16-bit data for most files (e.g. 16-bit PNG/TIFF); it is scaled as 32-bit only if values
    exceed 65535. Float data in [0, 1] is scaled by 255, any other range is min-max normalised.
    """
    if mode.startswith("I;16"):
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I":
        a = np.clip(arr.astype(np.int64), 0, None)
        shift = 24 if a.size and a.max() > 0xFFFF else 8
        return (a >> shift).astype(np.uint8)
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        return np.round(a * 255.0).astype(np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.round((a - lo) * scale).astype(np.uint8)
