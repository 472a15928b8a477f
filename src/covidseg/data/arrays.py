"""Read the prepared arrays and resize images and masks the way preprocessing does.

Training, evaluation, the figures and ``covidseg predict`` import from here, never from
:mod:`covidseg.data.preprocess` (which writes the arrays). Shapes are in that module's doc:
images uint8 (N, 1, S, S) grey levels, masks and lungs uint8 (N, 1, S, S) in {0, 1}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def resize_image(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) -> uint8 (size, size), bilinear with antialiasing."""
    if arr.shape == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def resize_mask(arr: np.ndarray, size: int, width: int | None = None) -> np.ndarray:
    """{0, 255} or {0, 1} mask (H, W) -> {0, 1} uint8 (size, width or size): bilinear in [0, 1], then > 0.5."""
    unit = (arr > 0).astype(np.float32)
    width = size if width is None else width
    if arr.shape != (size, width):
        unit = np.asarray(Image.fromarray(unit, mode="F").resize((width, size), Image.BILINEAR))
    return (unit > 0.5).astype(np.uint8)


def load_source(prepared_dir: str | Path) -> dict:
    """The ``source.json`` written by :func:`preprocess`, or an "unknown" record when there is none."""
    path = Path(prepared_dir) / "source.json"
    if not path.is_file():
        return {"data_source": "unknown", "synthetic": False, "split_counts": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def load_split(prepared_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """Load one split written by :func:`preprocess` into memory (see the module doc for shapes)."""
    path = Path(prepared_dir) / f"{split}.npz"
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def lung_flags(split: dict[str, np.ndarray]) -> np.ndarray:
    """bool (N,): which films of a loaded split have a true lung mask (all, unless ``has_lung`` says otherwise)."""
    if "has_lung" in split:
        return split["has_lung"].astype(bool)
    return np.ones(len(split["images"]), dtype=bool)
