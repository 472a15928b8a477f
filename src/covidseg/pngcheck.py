"""Decode one dataset PNG into a normalised 8-bit grey array, saying what had to be fixed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


class BadImageError(ValueError):
    """A file cannot be decoded as an image (truncated, corrupt, not an image)."""


def decode(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """Decode ``data`` into uint8 (H, W) grey levels and return it with the file's PIL mode.

    The mode is ``"L"`` for a file that was already 8-bit grey (the array is then exactly
    the stored pixels). RGB, RGBA, palette, 1-bit and grey+alpha files are converted to grey
    (ITU-R 601 luma, alpha dropped); 16-bit files (``I;16``) are scaled by 255/65535 and
    rounded. Raises BadImageError naming ``name`` when the bytes cannot be decoded
    (truncated, corrupt, not an image).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode == "L":
                return np.asarray(img, dtype=np.uint8).copy(), mode
            if mode in _SIXTEEN_BIT:
                arr = np.asarray(img).astype(np.float64)
                scale = 65535.0 if mode != "I" or arr.max() > 255 else 255.0
                return np.clip(np.round(arr * 255.0 / scale), 0, 255).astype(np.uint8), mode
            if mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                return np.clip(np.round(arr), 0, 255).astype(np.uint8), mode
            return np.asarray(img.convert("L"), dtype=np.uint8).copy(), mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{name}: cannot decode image ({exc})") from None


def decode_grey(data: bytes, name: str) -> tuple[np.ndarray, bool]:
    """Decode ``data`` into uint8 (H, W) grey levels; also return whether a conversion was needed.

    See :func:`decode` for the conversions. Raises BadImageError naming ``name``.
    """
    arr, mode = decode(data, name)
    return arr, mode != "L"


def binarise(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """Map a uint8 (H, W) grey mask to {0, 255} at 0.5 (value > 127); report whether other values were present.

    A mask that already holds only 0 and 255 is returned as is (not copied).
    """
    counts = np.bincount(mask.ravel(), minlength=256)
    if counts[0] + counts[255] == mask.size:
        return mask, False
    return np.where(mask > 127, 255, 0).astype(np.uint8), True


def encode_png(arr: np.ndarray) -> bytes:
    """Encode uint8 (H, W) as an 8-bit grey PNG."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
