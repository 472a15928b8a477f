"""A small synthetic chest-X-ray dataset in the exact COVID-QU-Ex Kaggle layout.

Each image has two dark lung fields, a brighter mediastinum, ribs, noise and a vignette;
COVID-19 images add hazy brighter infection patches inside the lungs. Masks are PNG mode
"L" with values {0, 255}; Non-COVID and Normal images have empty infection masks, as in
the real data. Everything is deterministic in the seed.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
from PIL import Image

from covidseg.atomic import atomic_dir
from covidseg.data.layout import CLASS_DIRS, IMAGES, INFECTION, LUNG, LUNG_DATA_NAME, ROOT_NAME, SPLIT_DIRS, file_name
from covidseg.params import SynthParams


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    return (arr - arr.min()) / max(float(np.ptp(arr)), 1e-6)


def make_case(rng: np.random.Generator, size: int, infected: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic X-ray.

    Returns:
        image: uint8 (size, size), grey levels 0..255.
        infection: uint8 (size, size), {0, 255}; all zero when ``infected`` is False.
        lung: uint8 (size, size), {0, 255}.
    """
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    body = _ellipse(yy, xx, 0.55 * s, 0.5 * s, 0.52 * s, 0.46 * s) < 1
    img = np.where(body, 0.62, 0.08).astype(np.float32)
    lung = np.zeros((size, size), bool)
    for side in (-1, 1):
        cx = 0.5 * s + side * rng.uniform(0.17, 0.21) * s
        cy = rng.uniform(0.46, 0.52) * s
        ry, rx = rng.uniform(0.25, 0.31) * s, rng.uniform(0.11, 0.14) * s
        lung |= _ellipse(yy, xx, cy, cx, ry, rx) < 1
    img[lung] = 0.28
    ribs = 0.5 + 0.5 * np.sin(yy / s * rng.uniform(28, 36) + 0.3 * np.sin(xx / s * 6))
    img += np.where(lung, 0.09 * ribs, 0.0)
    img += 0.12 * (_smooth_noise(rng, size, 6) - 0.5)

    infection = np.zeros((size, size), bool)
    if infected:
        field = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            ly, lx = np.nonzero(lung)
            k = int(rng.integers(len(ly)))
            r = rng.uniform(0.08, 0.17) * s
            field += np.exp(-_ellipse(yy, xx, ly[k], lx[k], r, r * rng.uniform(0.7, 1.4)))
        field *= 0.6 + 0.8 * _smooth_noise(rng, size, 10)
        infection = (field > 0.45) & lung
        if not infection.any():  # COVID-19 masks are never empty in the real data
            infection = (field >= field[lung].max() * 0.8) & lung
        haze = np.clip(field, 0, 1.2) * lung
        img += rng.uniform(0.18, 0.28) * haze
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    image = np.clip(img * 255, 0, 255).astype(np.uint8)
    return image, (infection * 255).astype(np.uint8), (lung * 255).astype(np.uint8)


def synthesize(out_dir: str | Path, params: SynthParams, seed: int) -> dict[str, int]:
    """Write the dataset under ``out_dir``/Infection Segmentation Data/Infection Segmentation Data, and the
    archive's other half under ``out_dir``/Lung Segmentation Data/Lung Segmentation Data.

    The lung half, as in the real archive, holds every film of the infection half again under other
    numbers (images and lung masks only), plus ``params.unlabeled`` COVID-19 films of its own: the films
    self-training may use (``data.unlabeled``). Replaces ``out_dir`` atomically. Returns the number of
    infection-half images written per split.
    """
    counts: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        root = tmp / ROOT_NAME / ROOT_NAME
        lung_root = tmp / LUNG_DATA_NAME / LUNG_DATA_NAME
        number = collections.Counter()  # the lung half's own numbering, per class
        for split_i, (split, split_dir) in enumerate(SPLIT_DIRS.items()):
            n_covid = getattr(params, split)
            counts[split] = 0
            for class_i, class_dir in enumerate(CLASS_DIRS):
                n = n_covid if class_dir == "COVID-19" else params.negatives
                for kind in (IMAGES, INFECTION, LUNG):  # every folder of the layout, even when empty
                    (root / split_dir / class_dir / kind).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    rng = np.random.default_rng([seed, split_i, class_i, i])
                    image, infection, lung = make_case(rng, params.image_size, infected=class_dir == "COVID-19")
                    name = file_name(class_dir, split_i * 100000 + i + 1)
                    _save(root / split_dir / class_dir, name, {IMAGES: image, INFECTION: infection, LUNG: lung})
                    number[class_dir] += 1
                    lung_name = file_name(class_dir, 50000 + number[class_dir])  # not the infection half's name
                    _save(lung_root / split_dir / class_dir, lung_name, {IMAGES: image, LUNG: lung})
                    counts[split] += 1
        for i in range(params.unlabeled):
            rng = np.random.default_rng([seed, 9, i])
            image, _, lung = make_case(rng, params.image_size, infected=True)
            split_dir = list(SPLIT_DIRS.values())[i % len(SPLIT_DIRS)]
            _save(lung_root / split_dir / "COVID-19", file_name("COVID-19", i + 1), {IMAGES: image, LUNG: lung})
    return counts


def _save(folder: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Each uint8 (H, W) array as ``folder/<kind>/name`` (8-bit grey PNG)."""
    for kind, arr in arrays.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode="L").save(folder / kind / name)
