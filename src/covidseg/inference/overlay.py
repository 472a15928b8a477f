"""Tint a region of a grey X-ray, outline the lungs, mark the sides: shared by the figures and `covidseg predict` (numpy; Pillow for the text)."""

from __future__ import annotations

import functools

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
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    if min(h, w) < ANNOTATE_MIN_SIDE:
        return rgb.copy()
    outline_cover, text_cover, swatches = _marks(h, w, float(threshold), bool(with_lungs))
    img = Image.fromarray(rgb)
    for color, (box, cover) in (((0, 0, 0), outline_cover), ((255, 255, 255), text_cover)):
        img.paste(color, box, mask=cover)  # blends by coverage, as drawing the text does
    draw = ImageDraw.Draw(img)
    for box, color in swatches:
        draw.rectangle(box, fill=color, outline=(0, 0, 0))
    return np.asarray(img, dtype=np.uint8).copy()


@functools.lru_cache(maxsize=16)
def _marks(h: int, w: int, threshold: float, with_lungs: bool):
    """The marks of :func:`annotate` for an h x w image, rendered once per size (text rendering with an
    outline costs more than the rest of an overlay): the coverage (mode "L", 0..255, cropped to where it is
    not 0) of the black text outline and of the white text, each with its box, and the legend's swatches
    as (box, RGB)."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(12, min(h, w) // 16)
    font = ImageFont.load_default(size=size)
    outline_cover, text_cover = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
    pad = size // 2

    def text(xy: tuple[int, int], label: str, stroke: int, anchor: str = "la") -> None:
        ImageDraw.Draw(outline_cover).text(
            xy, label, fill=255, font=font, anchor=anchor, stroke_width=stroke, stroke_fill=255
        )
        ImageDraw.Draw(text_cover).text(xy, label, fill=255, font=font, anchor=anchor)

    text((pad, pad), "R", max(1, size // 8))
    text((w - pad, pad), "L", max(1, size // 8), anchor="ra")
    entries = [(TINT, f"infection (p >= {threshold:g})")] + ([(LUNG_OUTLINE, "lungs (outline)")] if with_lungs else [])
    y = h - pad - len(entries) * (size + pad // 2)
    swatches = []
    for color, label in entries:
        swatches.append(((pad, y, pad + size, y + size), tuple(int(round(255 * c)) for c in color)))
        text((pad + size + pad // 2, y), label, 1)
        y += size + pad // 2
    crops = tuple((cover.getbbox(), cover.crop(cover.getbbox())) for cover in (outline_cover, text_cover))
    return *crops, tuple(swatches)
