"""`facecal.imageio`: photos as people take them — EXIF orientation, 16-bit and float pixels —
and the size limits and reduced-scale decoding the server relies on. Fixtures are made here."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from facecal.imageio import ImageError, ImageTooLarge, check_size, load_image, read_image


def asymmetric(h: int = 30, w: int = 50) -> np.ndarray:
    """An RGB picture no flip or rotation maps onto itself."""
    y, x = np.mgrid[:h, :w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * y) % 256], -1).astype(np.uint8)
    img[:5, :8] = (255, 0, 0)  # top-left marker
    return img


# What a viewer shows for each EXIF orientation of the stored pixels `a` (the TIFF/EXIF spec).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated 90° counter-clockwise: turn it clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored across the anti-diagonal
    8: lambda a: np.rot90(a, 1),
}


def with_orientation(pixels: np.ndarray, orientation: int, fmt: str) -> bytes:
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    kwargs = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    im.save(buf, fmt, exif=exif.tobytes(), **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation, fmt):
    stored = asymmetric()
    want = UPRIGHT[orientation](stored)
    pic = read_image(with_orientation(stored, orientation, fmt))
    assert pic.pixels.shape == want.shape
    assert (pic.width, pic.height) == (want.shape[1], want.shape[0])
    tol = 0 if fmt == "PNG" else 6  # JPEG at quality 100 is near, not exactly, lossless
    assert np.abs(pic.pixels.astype(int) - want.astype(int)).max() <= tol
    grey = load_image(with_orientation(stored, orientation, fmt), "L")
    assert grey.shape == want.shape[:2]


def png(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    """A PNG written byte by byte (PIL cannot write 16-bit RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw_rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 32).round().astype(">u2").reshape(32, 64)
    data = png(64, 32, 16, 0, b"".join(b"\x00" + row.tobytes() for row in values))
    want = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    grey = load_image(data, "L")
    np.testing.assert_array_equal(grey, want)
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) == 256
    rgb = load_image(data, "RGB")
    np.testing.assert_array_equal(rgb, np.repeat(want[..., None], 3, -1))


def test_16_bit_rgb_is_scaled():
    values = (np.arange(16 * 8 * 3).reshape(8, 16, 3) * 170).astype(">u2")
    data = png(16, 8, 16, 2, b"".join(b"\x00" + row.tobytes() for row in values))
    got = load_image(data, "RGB").astype(int)
    want = values.astype(np.float64) * 255 / 65535
    assert np.abs(got - want).max() <= 1  # PIL keeps the high byte: within one grey level


def test_float_and_32_bit_integer_images_are_scaled():
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(ramp, "F").save(buf, "TIFF")
    np.testing.assert_array_equal(load_image(buf.getvalue(), "L"), np.rint(ramp * 255))
    big = (ramp * 300).astype(np.float32)  # beyond [0, 1]: taken as 0…255, clipped
    buf = io.BytesIO()
    Image.fromarray(big, "F").save(buf, "TIFF")
    np.testing.assert_array_equal(load_image(buf.getvalue(), "L"), np.rint(big).clip(0, 255))
    wide = (ramp * 65535).round().astype(np.int32)
    buf = io.BytesIO()
    Image.fromarray(wide, "I").save(buf, "TIFF")
    np.testing.assert_array_equal(load_image(buf.getvalue(), "L"), np.rint(wide * 255 / 65535))
    bad = ramp.copy()
    bad[3, 3] = np.nan
    buf = io.BytesIO()
    Image.fromarray(bad, "F").save(buf, "TIFF")
    with pytest.raises(ImageError, match="NaN or infinite"):
        load_image(buf.getvalue())


def test_size_limits_are_checked_from_the_header():
    check_size("x", 4000, 3000, 16_000_000, 8192, 8)
    with pytest.raises(ImageTooLarge, match="limit of 100 pixels"):
        check_size("x", 20, 6, 100)
    with pytest.raises(ImageTooLarge, match="a side exceeds the limit of 8192"):
        check_size("x", 9000, 10, 16_000_000, 8192)
    with pytest.raises(ImageTooLarge, match="aspect ratio exceeds the limit of 8:1"):
        check_size("x", 900, 100, 16_000_000, 8192, 8)
    thin = png(100_000, 1, 8, 0, b"\x00" + b"\x00" * 100_000)
    with pytest.raises(ImageTooLarge, match=r"<bytes>: 100000×1: a side"):
        load_image(thin, max_side=8192)
    assert load_image(thin).shape == (1, 100_000, 3)  # without the limits it still decodes


def test_resize_to_decodes_a_jpeg_at_reduced_scale():
    big = np.zeros((3000, 4000, 3), np.uint8)
    big[:, :2000] = 200
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG", quality=90)
    pic = read_image(buf.getvalue(), resize_to=1000)
    assert pic.pixels.shape == (750, 1000, 3)
    assert (pic.width, pic.height) == (4000, 3000)  # the full size, for scaling points back
    assert abs(int(pic.pixels[375, 250, 0]) - 200) <= 2 and pic.pixels[375, 750, 0] <= 2
    box = read_image(buf.getvalue(), resize_to=(64, 64))
    assert box.pixels.shape == (64, 64, 3)
    small = read_image(buf.getvalue(), resize_to=5000)  # never enlarged
    assert small.pixels.shape == (3000, 4000, 3)


def test_resize_to_follows_the_exif_orientation():
    stored = np.zeros((200, 400, 3), np.uint8)  # landscape as stored, portrait when shown
    pic = read_image(with_orientation(stored, 6, "JPEG"), resize_to=100)
    assert pic.pixels.shape == (100, 50, 3) and (pic.width, pic.height) == (200, 400)
