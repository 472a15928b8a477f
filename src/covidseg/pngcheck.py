"""Decode one dataset PNG into a normalised 8-bit grey array, saying what had to be fixed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """A file cannot be decoded as an image (truncated, corrupt, not an image)."""


def decode_grey(data: bytes, name: str) -> tuple[np.ndarray, bool]:
    """Decode ``data`` into uint8 (H, W) grey levels.

    RGB, RGBA, palette and grey+alpha files are converted to grey (ITU-R 601 luma, alpha
    dropped); 16-bit files are scaled by 255/65535. Returns the array and whether a
    conversion was needed. Raises BadImageError naming ``name`` when it cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode == "L":
                return np.asarray(img, dtype=np.uint8).copy(), False
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img).astype(np.float64)
                scale = 65535.0 if mode != "I" or arr.max() > 255 else 255.0
                return np.clip(np.round(arr * 255.0 / scale), 0, 255).astype(np.uint8), True
            if mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                return np.clip(np.round(arr), 0, 255).astype(np.uint8), True
            return np.asarray(img.convert("L"), dtype=np.uint8).copy(), True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"{name}: cannot decode image ({exc})") from None


def binarise(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """Map a grey mask to {0, 255} at 0.5 (value > 127.5); report whether other values were present."""
    clean = np.isin(mask, (0, 255)).all()
    return np.where(mask > 127, 255, 0).astype(np.uint8), not bool(clean)


def encode_png(arr: np.ndarray) -> bytes:
    """Encode uint8 (H, W) as an 8-bit grey PNG."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
