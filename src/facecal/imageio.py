"""Safe image reading and deterministic writing.

Every reader in facecal goes through `load_image`, so a corrupt, truncated or oversized file
always raises `ImageError` naming the file — never a bare PIL exception, a silently half-decoded
picture, or a decompression bomb.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from facecal.errors import FacecalError

# Refuse half-decoded pictures: a truncated file is an error, not a grey bottom stripe.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MAX_PIXELS = 40_000_000  # 40 MP: larger than any face photo, far below a bomb's memory blow-up


class ImageError(FacecalError):
    """An image that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def load_image(
    src: str | Path | bytes, mode: str = "RGB", max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode an image file (or its bytes) into a uint8 array (H×W for ``L``, H×W×3 for ``RGB``)."""
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
                    if w * h > max_pixels:
                        raise ImageError(name, f"{w}×{h} pixels exceeds the limit of {max_pixels}")
                    im.load()
                    return np.asarray(im.convert(mode)).copy()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(name, "image too large (decompression bomb guard)") from None
        except Image.UnidentifiedImageError:
            raise ImageError(name, "not a readable image (unknown or corrupt format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(name, f"corrupt or truncated image ({e})") from None


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


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()
