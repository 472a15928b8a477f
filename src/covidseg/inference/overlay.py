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
