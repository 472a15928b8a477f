"""Contrast normalisation of grey X-rays (``preprocess.contrast``): none, global equalisation, CLAHE.

Applied to the resized uint8 images in preprocessing, in ``covidseg predict`` (both backends) and
by the torch-free ONNX runner, so the model always sees images normalised the same way. NumPy
only: the ONNX runner ships this module without torch, OpenCV or scikit-image.

Both methods map grey levels through a cumulative histogram, as Zuiderveld's CLAHE and OpenCV's
``createCLAHE`` do::

    lut[v] = floor(255 * cdf[v] / n + 1/2)      cdf[v] = number of pixels <= v, n = pixels counted

computed exactly in integers (rounded half up). So a constant image stays constant: global
equalisation maps its one level c to 255 (cdf[c] = n); CLAHE, whose clip limit flattens a
one-level histogram, maps it to one value near c (e.g. 0 -> 3, 128 -> 131, 255 -> 255 for 32 x 32
tiles).

CLAHE (contrast-limited adaptive histogram equalisation), with OpenCV's conventions:

- ``TILES`` x ``TILES`` = 8 x 8 tiles; an image whose sides are not multiples of 8 is padded at the
  bottom and right by mirroring without repeating the edge (OpenCV's BORDER_REFLECT_101) for the
  histograms only;
- clip limit ``CLIP_LIMIT`` = 2.0, relative to the uniform bin height: a bin holds at most
  ``max(int(2.0 * tile_pixels / 256), 1)`` counts;
- the clipped excess is spread uniformly: ``excess // 256`` to every bin, then one more to the
  first ``excess % 256`` of bins 0, s, 2s, ... with step ``s = max(256 // (excess % 256), 1)``;
- each tile's lut as above (n = tile_pixels), then every pixel is interpolated bilinearly between
  the luts of the four tiles whose centres surround it (pixel x sits at tile coordinate
  ``x / tile_width - 0.5``; beyond the outer centres the nearest tile's lut is used alone) and
  rounded half up.
"""

from __future__ import annotations

import numpy as np

from covidseg.params import CONTRAST_METHODS

TILES = 8  # CLAHE tiles per side
CLIP_LIMIT = 2.0  # CLAHE clip limit, in multiples of the uniform bin height (tile_pixels / 256)
LEVELS = 256


def check_method(method: str, where: str = "contrast") -> str:
    """``method`` if it is one of :data:`CONTRAST_METHODS`, else ValueError naming it and ``where`` it came from."""
    if method not in CONTRAST_METHODS:
        raise ValueError(f"{where}: unknown contrast method {method!r}; choose from {list(CONTRAST_METHODS)}")
    return method


def normalise_contrast(image: np.ndarray, method: str) -> np.ndarray:
    """uint8 (H, W) or (N, H, W) -> uint8 of the same shape, normalised by ``method`` (see the module doc).

    ``none`` returns the input unchanged (the same array); each image of a stack is normalised on its own.
    Raises ValueError for an unknown method (naming it) or an input that is not uint8 2-D/3-D.
    """
    check_method(method)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or 0 in image.shape[-2:]:
        raise ValueError(f"contrast {method!r}: expects uint8 (H, W) or (N, H, W), got {image.dtype} {image.shape}")
    if method == "none":
        return image
    fn = equalize if method == "equalize" else clahe
    if image.ndim == 2:
        return fn(image)
    return np.stack([fn(im) for im in image]) if len(image) else image.copy()


def _cdf_lut(hist: np.ndarray, n: int) -> np.ndarray:
    """int64 histograms (..., 256) summing to ``n`` -> uint8 luts (..., 256): floor(255 cdf / n + 1/2)."""
    cdf = np.cumsum(hist, axis=-1, dtype=np.int64)
    return ((510 * cdf + n) // (2 * n)).astype(np.uint8)


def equalize(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of uint8 (H, W): ``lut[v] = floor(255 cdf[v] / n + 1/2)``."""
    hist = np.bincount(image.ravel(), minlength=LEVELS)
    return _cdf_lut(hist, image.size)[image]


def _clip(hist: np.ndarray, limit: int) -> np.ndarray:
    """Clip int64 histograms (T, 256) at ``limit`` and spread the excess as OpenCV does (module doc)."""
    excess = np.maximum(hist - limit, 0).sum(axis=-1, keepdims=True)
    hist = np.minimum(hist, limit) + excess // LEVELS
    residual = excess % LEVELS
    step = np.maximum(LEVELS // np.maximum(residual, 1), 1)
    bins = np.arange(LEVELS)
    return hist + ((bins % step == 0) & (bins // step < residual))


def _weights(length: int, tile: int, tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel along one axis: (lower tile index, upper tile index, weight of the upper tile)."""
    t = np.arange(length, dtype=np.float64) / tile - 0.5
    lo = np.floor(t)
    w = (t - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    return np.clip(lo, 0, tiles - 1), np.clip(lo + 1, 0, tiles - 1), w


def clahe(image: np.ndarray, tiles: int = TILES, clip_limit: float = CLIP_LIMIT) -> np.ndarray:
    """CLAHE of uint8 (H, W) with ``tiles`` x ``tiles`` tiles and ``clip_limit`` (see the module doc).

    ``clip_limit`` <= 0 turns clipping off (plain adaptive equalisation); with ``tiles=1`` and no
    clipping this is :func:`equalize`.
    """
    if tiles < 1:
        raise ValueError(f"clahe: tiles must be >= 1, got {tiles}")
    h, w = image.shape
    ph, pw = -h % tiles, -w % tiles
    if ph or pw:
        if ph >= h or pw >= w:
            raise ValueError(f"clahe: image {h}x{w} is too small for {tiles}x{tiles} tiles")
        padded = np.pad(image, ((0, ph), (0, pw)), mode="reflect")  # numpy's reflect = BORDER_REFLECT_101
    else:
        padded = image
    th, tw = padded.shape[0] // tiles, padded.shape[1] // tiles
    area = th * tw
    # tile index of every pixel * 256 + its level -> one bincount gives every tile's histogram
    tile_of = (np.arange(padded.shape[0]) // th)[:, None] * tiles + (np.arange(padded.shape[1]) // tw)[None, :]
    hist = np.bincount((tile_of * LEVELS + padded).ravel(), minlength=tiles * tiles * LEVELS)
    hist = hist.reshape(tiles * tiles, LEVELS).astype(np.int64)
    if clip_limit > 0:
        hist = _clip(hist, max(int(clip_limit * area / LEVELS), 1))
    luts = _cdf_lut(hist, area).astype(np.float32).ravel()  # (tiles * tiles * 256,), exact integers

    y1, y2, wy = _weights(h, th, tiles)
    x1, x2, wx = _weights(w, tw, tiles)
    level = image.astype(np.int64)
    # flat lut index of (tile row, tile column, level) for the four surrounding tiles
    corner = lambda ty, tx: luts.take((ty[:, None] * tiles + tx[None, :]) * LEVELS + level)  # noqa: E731
    top = corner(y1, x1) * (1 - wx) + corner(y1, x2) * wx
    bottom = corner(y2, x1) * (1 - wx) + corner(y2, x2) * wx
    out = np.floor(top * (1 - wy)[:, None] + bottom * wy[:, None] + 0.5)
    return np.clip(out, 0, 255).astype(np.uint8)
