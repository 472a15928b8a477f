"""Decode one dataset PNG into a normalised 8-bit grey array, saying what had to be fixed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

_WIDE_INT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# The first bytes of the formats PIL reads here (WebP: b"RIFF" + 4 size bytes + b"WEBP", see is_image_start).
IMAGE_SIGNATURES = (PNG_SIGNATURE, JPEG_SIGNATURE, b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# An image whose central 98 % of pixels spans fewer grey levels than this (of 0-255) is flagged.
LOW_RANGE_LEVELS = 16


class BadImageError(ValueError):
    """A file cannot be decoded as an image (truncated, corrupt, not an image)."""


def is_image_start(head: bytes) -> bool:
    """Whether ``head``, a file's first bytes (12 suffice), starts one of the formats of :data:`IMAGE_SIGNATURES`."""
    return head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def png_significant_bits(data: bytes, name: str) -> int | None:
    """The grey significant bits a PNG declares in its sBIT chunk, or None (no sBIT, or not a PNG).

    Walks the chunks up to the first IDAT (PIL does not read sBIT). For grey(+alpha) images
    the first sBIT byte is the grey channel's bits. Raises BadImageError naming ``name`` when
    the sBIT value is outside 1 to the file's bit depth.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, depth = len(PNG_SIGNATURE), None
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 10:
            depth, colour = body[8], body[9]
            if colour not in (0, 4):  # sBIT is only used for grey images here
                return None
        elif kind == b"sBIT" and body and depth is not None:
            bits = body[0]
            if not 1 <= bits <= depth:
                raise BadImageError(
                    f"{name}: PNG sBIT chunk declares {bits} significant bits, "
                    f"outside 1-{depth} for this {depth}-bit image"
                )
            return bits
        elif kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def scale_to_uint8(arr: np.ndarray, significant_bits: int | None = None, name: str = "image") -> np.ndarray:
    """Map integer or float grey levels (H, W) to uint8 by their declared or inferred full scale.

    Integers: full scale is ``2 ** significant_bits - 1`` when the file declares its
    significant bits (PNG sBIT; a DICOM decoder would pass BitsStored) and no pixel exceeds
    it; otherwise (no declaration, or values already stretched to the container's depth as
    the PNG spec asks) ``2 ** b - 1`` with ``b`` the bit length of the image's maximum, at
    least 8 (0-4095 is read as 12-bit, 0-255 as 8-bit). Floats: values within [0, 1] are
    fractions of full scale; larger ones follow the integer rule on ``ceil(max)``. The result
    is ``round(value * 255 / full_scale)``; there is never a min-max stretch, so a level
    means the same in every image. Raises BadImageError naming ``name`` for negative or
    non-finite values (their scale is unknown).
    """
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise BadImageError(f"{name}: image holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0:
        raise BadImageError(f"{name}: image holds negative values (minimum {low:g}); its grey scale is unknown")
    if np.issubdtype(arr.dtype, np.floating) and high <= 1.0:
        full = 1.0
    elif significant_bits is not None and high <= 2**significant_bits - 1:
        full = float(2**significant_bits - 1)
    else:
        full = float(2 ** max(8, int(np.ceil(high)).bit_length()) - 1)
    return np.clip(np.round(values * (255.0 / full)), 0, 255).astype(np.uint8)


def low_range_warning(grey: np.ndarray, name: str) -> str | None:
    """A warning naming ``name`` when uint8 (H, W) ``grey`` has almost no dynamic range, else None.

    Measured as the spread between the 1st and 99th percentile grey levels; below
    :data:`LOW_RANGE_LEVELS` the image is nearly uniform (blank, or decoded at the wrong scale).
    """
    if grey.size == 0:
        return None
    lo, hi = (int(v) for v in np.percentile(grey, [1, 99], method="nearest"))
    if hi - lo >= LOW_RANGE_LEVELS:
        return None
    return (
        f"{name}: almost no contrast after decoding (1st-99th percentile grey levels {lo}-{hi} of 0-255); "
        "the prediction may be meaningless"
    )


def decode(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """Decode ``data`` into uint8 (H, W) grey levels and return it with the file's PIL mode.

    The mode is ``"L"`` for a file that was already 8-bit grey (the array is then exactly
    the stored pixels). RGB, RGBA, palette, 1-bit and grey+alpha files are converted to grey
    (ITU-R 601 luma, alpha dropped); 16- and 32-bit integer files (``I;16``, ``I``) and float
    files (``F``) are scaled by :func:`scale_to_uint8`, with a PNG's sBIT as the significant
    bits. Raises BadImageError naming ``name`` when the bytes cannot be decoded
    (truncated, corrupt, not an image) or hold values with no known scale.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode == "L":
                return np.asarray(img, dtype=np.uint8).copy(), mode
            if mode in _WIDE_INT or mode == "F":
                bits = png_significant_bits(data, name) if mode in _WIDE_INT else None
                return scale_to_uint8(np.asarray(img), bits, name), mode
            return np.asarray(img.convert("L"), dtype=np.uint8).copy(), mode
    except BadImageError:
        raise
    except UnidentifiedImageError:
        if data.startswith((PNG_SIGNATURE, JPEG_SIGNATURE)):
            raise BadImageError(
                f"{name}: cannot decode image (a damaged PNG or JPEG: its header is unreadable)"
            ) from None
        kind = "an empty file" if not data else f"starts with {data[:8]!r}"
        raise BadImageError(f"{name}: not an image ({kind}; no image format recognised)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
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


def mask_to_255(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """A uint8 (H, W) mask as {0, 255} and what was done ("" when nothing): 0/1 masks scaled, others binarised."""
    if mask.size and mask.max() == 1:
        return mask * np.uint8(255), "mask values 0/1 read as 0/255"
    arr, changed = binarise(mask)
    return arr, "mask values other than 0 and 255, binarised at 0.5 (> 127)" if changed else ""


def encode_png(arr: np.ndarray) -> bytes:
    """Encode uint8 (H, W) as an 8-bit grey PNG."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
