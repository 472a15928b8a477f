"""Tint a region of a grey X-ray, outline the lungs, mark the sides: shared by the figures and `covidseg predict` (numpy; Pillow for the text)."""

from __future__ import annotations

import numpy as np

TINT = (1.0, 0.8, 0.0)  # the prediction colour (RGB in [0, 1])
TINT_ALPHA = 0.45


def tint(
    grey: np.ndarray, mask: np.ndarray, color: tuple[float, float, float] = TINT, alpha: float = TINT_ALPHA
) -> np.ndarray:
    """uint8 RGB (H, W, 3) of grey uint8 (H, W) with bool ``mask`` (H, W) blended towards ``color`` (RGB in [0, 1])."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    tinted = (1 - alpha) * grey[mask][:, None].astype(np.float32) + alpha * 255.0 * np.asarray(color, np.float32)
    rgb[mask] = np.clip(np.round(tinted), 0, 255).astype(np.uint8)
    return rgb


LUNG_OUTLINE = (0.1, 0.8, 1.0)  # the predicted lungs' outline colour (RGB in [0, 1])


def outline(mask: np.ndarray) -> np.ndarray:
    """bool (H, W): the pixels of bool ``mask`` (H, W) that touch a non-mask pixel (4-neighbour boundary)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def draw_outline(rgb: np.ndarray, mask: np.ndarray, color: tuple[float, float, float] = LUNG_OUTLINE) -> np.ndarray:
    """Copy of uint8 RGB (H, W, 3) ``rgb`` with the outline of bool ``mask`` (H, W) drawn in ``color``."""
    out = rgb.copy()
    out[outline(mask)] = np.round(255 * np.asarray(color)).astype(np.uint8)
    return out


ANNOTATE_MIN_SIDE = 128  # pixels: smaller images get no marks (they would hide the image)


def annotate(rgb: np.ndarray, threshold: float, with_lungs: bool) -> np.ndarray:
    """Copy of uint8 RGB (H, W, 3) with the patient's side marked and a legend, as a reader of a film expects.

    "R" in the top-left and "L" in the top-right corner (a PA/AP film is read facing the patient:
    image left = the patient's right); bottom-left, a legend: a swatch of :data:`TINT` for
    "infection (p >= threshold)" and, ``with_lungs``, one of :data:`LUNG_OUTLINE` for the
    predicted lungs' outline. Images with a side under :data:`ANNOTATE_MIN_SIDE` are returned unchanged.
    """
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    if min(h, w) < ANNOTATE_MIN_SIDE:
        return rgb.copy()
    size = max(12, min(h, w) // 16)
    font = ImageFont.load_default(size=size)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    pad, white, black = size // 2, (255, 255, 255), (0, 0, 0)
    draw.text((pad, pad), "R", fill=white, font=font, stroke_width=max(1, size // 8), stroke_fill=black)
    draw.text(
        (w - pad, pad), "L", fill=white, font=font, anchor="ra", stroke_width=max(1, size // 8), stroke_fill=black
    )
    entries = [(TINT, f"infection (p >= {threshold:g})")] + ([(LUNG_OUTLINE, "lungs (outline)")] if with_lungs else [])
    y = h - pad - len(entries) * (size + pad // 2)
    for color, label in entries:
        swatch = tuple(int(round(255 * c)) for c in color)
        draw.rectangle((pad, y, pad + size, y + size), fill=swatch, outline=black)
        draw.text((pad + size + pad // 2, y), label, fill=white, font=font, stroke_width=1, stroke_fill=black)
        y += size + pad // 2
    return np.asarray(img, dtype=np.uint8).copy()
