"""Tint a region of a grey X-ray: shared by the figures and by ``covidseg predict`` (numpy only)."""

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
