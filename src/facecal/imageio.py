"""Safe image reading and deterministic writing.

Every reader in facecal goes through `load_image` (or `read_image`, which also reports the
full-resolution size), so a corrupt, truncated or oversized file always raises `ImageError`
naming the file — never a bare PIL exception, a silently half-decoded picture, or a
decompression bomb. Every load also applies the EXIF orientation (a phone photo stored sideways
with an orientation tag comes out upright, as every viewer shows it) and scales 16-bit and
floating-point pixels to 8 bits by their range (PIL's own conversion clips them: a 16-bit grey
PNG would come out all white).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from facecal.errors import FacecalError

# Refuse half-decoded pictures: a truncated file is an error, not a grey bottom stripe.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MAX_PIXELS = 40_000_000  # 40 MP: larger than any face photo, far below a bomb's memory blow-up
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_AXES = (5, 6, 7, 8)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(FacecalError):
    """An image that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ImageTooLarge(ImageError):
    """Refused from the header alone (pixel count, side length or aspect ratio)."""


@dataclass(frozen=True)
class Picture:
    pixels: np.ndarray  # uint8 H×W (``L``) or H×W×3 (``RGB``), upright
    width: int  # the full-resolution size, upright; differs from `pixels` after `resize_to`
    height: int


def check_size(
    name: str,
    width: int,
    height: int,
    max_pixels: int,
    max_side: int | None = None,
    max_aspect: float | None = None,
) -> None:
    """Refuse a size before anything is decoded (`ImageTooLarge` naming the limit)."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            name, f"{width}×{height} pixels exceeds the limit of {max_pixels} pixels"
        )
    if max_side is not None and max(width, height) > max_side:
        raise ImageTooLarge(name, f"{width}×{height}: a side exceeds the limit of {max_side}")
    if max_aspect is not None and max(width, height) > max_aspect * max(1, min(width, height)):
        raise ImageTooLarge(
            name, f"{width}×{height}: aspect ratio exceeds the limit of {max_aspect:g}:1"
        )


def load_image(
    src: str | Path | bytes,
    mode: str = "RGB",
    max_pixels: int = MAX_PIXELS,
    *,
    max_side: int | None = None,
    max_aspect: float | None = None,
) -> np.ndarray:
    """Decode an image file (or its bytes) into an upright uint8 array (H×W for ``L``,
    H×W×3 for ``RGB``)."""
    return read_image(src, mode, max_pixels, max_side=max_side, max_aspect=max_aspect).pixels


def read_image(
    src: str | Path | bytes,
    mode: str = "RGB",
    max_pixels: int = MAX_PIXELS,
    *,
    max_side: int | None = None,
    max_aspect: float | None = None,
    resize_to: int | tuple[int, int] | None = None,
) -> Picture:
    """`load_image` that also returns the full-resolution (upright) size.

    `resize_to` returns the pixels resized (LANCZOS) to a (width, height) box, or shrunk to a
    longest side (an int; smaller pictures are left as they are). The resize happens before
    the pixels leave PIL, and formats that can decode at a reduced scale (JPEG: 1/2, 1/4, 1/8
    inside libjpeg) are decoded at the smallest such scale that still covers the target: a
    caller that wants a small picture never holds the full-resolution pixels twice.
    """
    name = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else open(src, "rb")
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except OSError as e:
        raise ImageError(name, f"cannot open: {e.strerror or e}") from None
    with fp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fp) as im:
                    w, h = im.size
                    check_size(name, w, h, max_pixels, max_side, max_aspect)
                    target = _target_size(w, h, resize_to)
                    if target is not None:
                        # In the file's orientation (EXIF is applied after decoding): a box is
                        # made square so that it is covered whichever way the picture turns.
                        box = target if isinstance(resize_to, int) else (max(target),) * 2
                        im.draft(None, box)
                    im.load()
                    swap = _orientation(im) in _SWAPS_AXES
                    ImageOps.exif_transpose(im, in_place=True)  # in place: no extra copy
                    full = (h, w) if swap else (w, h)
                    out = _to_mode(im, mode, name)
                    target = _target_size(*full, resize_to)
                    if target is not None and out.size != target:
                        small = out.resize(target, Image.Resampling.LANCZOS)
                        out.close()
                        out = small
                    pixels = np.asarray(out)  # read-only view of a bytes copy
                    out.close()
                    return Picture(pixels.copy(), *full)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(name, "image too large (decompression bomb guard)") from None
        except Image.UnidentifiedImageError:
            raise ImageError(name, "not a readable image (unknown or corrupt format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(name, f"corrupt or truncated image ({e})") from None


def _orientation(im: Image.Image) -> int:
    try:
        value: Any = im.getexif().get(0x0112, 1)
        return int(value)
    except (TypeError, ValueError, SyntaxError, OSError):
        return 1  # an unreadable EXIF block: PIL's exif_transpose leaves such images as they are


def _target_size(w: int, h: int, resize_to: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if resize_to is None:
        return None
    if isinstance(resize_to, tuple):
        return resize_to
    if max(w, h) <= resize_to:
        return None
    f = resize_to / max(w, h)
    return max(1, round(w * f)), max(1, round(h * f))


def _to_mode(im: Image.Image, mode: str, name: str) -> Image.Image:
    """`im` as an 8-bit image in `mode`; closes `im` (and every intermediate) as soon as it is
    converted, so the peak stays near 7 bytes per pixel for 8-bit RGB.

    PIL's `convert` clips 16-bit and float values into 0…255; those are scaled by their range.
    """
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        # "I" (32-bit) is how PIL holds 16-bit data from some files: read as 16-bit, clipped.
        wide = np.array(im, dtype=np.int32)
        im.close()
        np.clip(wide, 0, 65535, out=wide)
        wide *= 255
        wide += 32767  # round to nearest: 65535 → 255, 32768 → 128
        wide //= 65535
        im = Image.fromarray(wide.astype(np.uint8), "L")
        del wide
    elif im.mode == "F":
        values = np.array(im, dtype=np.float32)
        im.close()
        if not np.isfinite(values).all():
            raise ImageError(name, "floating-point image with NaN or infinite pixels")
        # Float images hold [0, 1] by convention; anything beyond is taken as 0…255.
        if values.size and values.min() >= 0 and values.max() <= 1:
            values *= 255
        np.clip(values, 0, 255, out=values)
        im = Image.fromarray(np.rint(values).astype(np.uint8), "L")
        del values
    if im.mode != mode:
        converted = im.convert(mode)
        im.close()
        im = converted
    return im


def save_image(array: np.ndarray, path: str | Path, quality: int = 95) -> None:
    """Write uint8 pixels atomically (tmp file + rename); format from the suffix.

    PNG and JPEG output carry no timestamps, so equal pixels give byte-identical files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.ascontiguousarray(array))
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported image suffix (use .png or .jpg)")
    kwargs = {"quality": quality, "subsampling": 0} if fmt == "JPEG" else {"optimize": False}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            im.save(f, format=fmt, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# zlib level of the PNGs the server answers with: latency over bytes (see `encode_png`).
RESPONSE_PNG_LEVEL = 1


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes; `compress_level` 0–9 is zlib's (6: PIL's default). Serving answers with 1:
    a 256² photo encodes in about 9 ms instead of 40, 15 % larger."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()
