"""decode_image on the odd files real datasets contain."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from wsss.data.io import IMAGE_EXTENSIONS, ImageDecodeError, decode_image


def _rgb(h: int = 20, w: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.shape == (h, w, 3) and arr.dtype == np.uint8 and arr.flags.c_contiguous


def test_png_roundtrip_exact(tmp_path: Path) -> None:
    img = _rgb()
    Image.fromarray(img).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    _check(out, 20, 30)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(decode_image(str(tmp_path / "a.png")), img)


def test_cv2_written_jpeg_is_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((16, 16, 3), np.uint8)
    bgr[..., 2] = 255  # red in BGR
    cv2.imwrite(str(tmp_path / "r.jpg"), bgr)
    out = decode_image(tmp_path / "r.jpg")
    assert out[..., 0].min() > 240 and out[..., 2].max() < 15


def test_exif_orientation_swaps_dimensions(tmp_path: Path) -> None:
    img = np.zeros((20, 40, 3), np.uint8)
    img[:6, :6] = 255  # white block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rot.jpg")
    _check(out, 40, 20)
    assert out[:6, -6:].mean() > 200 and out[:6, :6].mean() < 50  # top-left moved to top-right


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_bilevel(tmp_path: Path, mode: str) -> None:
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    Image.fromarray(grey).convert(mode).save(tmp_path / "g.png")
    out = decode_image(tmp_path / "g.png")
    _check(out, 8, 16)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    if mode == "L":
        np.testing.assert_array_equal(out[..., 0], grey)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.dstack([_rgb(), np.zeros((20, 30), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "a.png"), rgba[..., :3])


def test_grey_alpha(tmp_path: Path) -> None:
    Image.new("LA", (5, 4), (77, 10)).save(tmp_path / "la.png")
    out = decode_image(tmp_path / "la.png")
    _check(out, 4, 5)
    assert (out == 77).all()


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    data = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "d.png")
    out = decode_image(tmp_path / "d.png")
    _check(out, 1, 5)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 128, 255])


def test_float_tiff(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(decode_image(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])


def test_int32_tiff(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 65535, 2**31 - 1]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(decode_image(tmp_path / "i.tif")[0, :, 0], [0, 0, 127])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    out = decode_image(tmp_path / "c.jpg")
    _check(out, 6, 8)
    assert out[..., 0].min() > 240 and out[..., 1:].max() < 15  # pure red


def test_palette_png_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 3))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "pt.png", transparency=0)
    for name in ("p.png", "pt.png"):
        out = decode_image(tmp_path / name)
        _check(out, 3, 4)
        assert tuple(out[1, 1]) == (10, 200, 30) and tuple(out[0, 0]) == (0, 0, 0)


def test_webp_bmp_and_ycbcr(tmp_path: Path) -> None:
    img = _rgb()
    for ext in (".bmp", ".webp"):
        Image.fromarray(img).save(tmp_path / f"x{ext}", lossless=True)
        np.testing.assert_array_equal(decode_image(tmp_path / f"x{ext}"), img)
    Image.fromarray(img).convert("YCbCr").save(tmp_path / "y.tif")
    _check(decode_image(tmp_path / "y.tif"), 20, 30)
    assert ".webp" in IMAGE_EXTENSIONS and ".tiff" in IMAGE_EXTENSIONS


def test_bytes_input() -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue()), _rgb())
    with pytest.raises(ImageDecodeError, match=r"<bytes>: empty file"):
        decode_image(b"")


def test_missing_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"nope\.jpg: file not found"):
        decode_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty\.jpg: empty file"):
        decode_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        decode_image(tmp_path)


def test_text_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "t.jpg").write_text("hello, I am not a picture\n")
    with pytest.raises(ImageDecodeError, match=r"t\.jpg: not a recognised image format"):
        decode_image(tmp_path / "t.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"cut\.\w+: truncated or corrupt"):
        decode_image(path)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):  # header cut short too
        decode_image(data[:40])


def test_jpeg_missing_only_end_marker(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(buf.getvalue()[:-2])


def test_pixel_guard_before_decoding(tmp_path: Path) -> None:
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match=r"big\.png: image has 30x20 = 600 pixels, more than max_pixels=599"):
        decode_image(tmp_path / "big.png", max_pixels=599)
    _check(decode_image(tmp_path / "big.png", max_pixels=600), 20, 30)


def test_pixel_guard_reads_header_only(tmp_path: Path) -> None:
    # A header claiming 5000 x 5000 pixels over 64 pixels of data: must fail on size, not on decoding.
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = (5000).to_bytes(4, "little") * 2
    with pytest.raises(ImageDecodeError, match=r"<bytes>: image has 5000x5000 = 25000000 pixels"):
        decode_image(bytes(data), max_pixels=10**6)
