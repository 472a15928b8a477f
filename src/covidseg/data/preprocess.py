"""Turn the extracted subset into a few flat arrays per split, decoded and resized once.

``out_dir/{train,val,test}.npz`` each hold
    images     uint8 (N, 1, S, S)  grey levels after ``preprocess.contrast`` (covidseg.data.contrast);
                                   the model divides by 255 to get [0, 1]
    masks      uint8 (N, 1, S, S)  infection, {0, 1}, binarised at 0.5 after resizing
    lungs      uint8 (N, 1, S, S)  lung fields, {0, 1}; all 0 where ``has_lung`` is False
    has_lung   bool  (N,)          whether the film has a lung mask; written only when one lacks it
                                   (a manifest's film may): read it with ``arrays.lung_flags``
    ids        str   (N,)          file stems, e.g. ``covid_12``
    classes    str   (N,)          ``COVID-19``, ``Non-COVID`` or ``Normal``

with ``data.unlabeled``, ``out_dir/unlabeled.npz`` holds the archive's unlabeled films (``images``, ``lungs``,
``ids``; no masks: self-training pseudo-labels them), and ``out_dir/source.json`` says where they came from (recorded by training in the model file):
``{"data_source": base name of data.source, "synthetic": bool, "split_counts": {split: N},
"contrast": the preprocess.contrast method applied to the images}``.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from covidseg.atomic import atomic_dir, write_json
from covidseg.data.arrays import resize_image, resize_mask
from covidseg.data.contrast import normalise_contrast
from covidseg.data.layout import IMAGES, INFECTION, LUNG, SPLITS, subset_member
from covidseg.params import PreprocessParams


def _decode(data: bytes) -> np.ndarray:
    """PNG bytes from the extracted subset (8-bit grey, see covidseg.data.extract) -> uint8 (H, W)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)


def preprocess(extracted_dir: str | Path, out_dir: str | Path, params: PreprocessParams) -> dict[str, int]:
    """Write one ``.npz`` per split (see the module doc); returns the number of pairs per split.

    Every PNG is decoded once and resized only when its size differs from ``params.image_size``;
    the images (never the masks) are then contrast-normalised by ``params.contrast``.
    The output directory is replaced atomically: on any error the previous one is kept.
    """
    extracted_dir = Path(extracted_dir)
    for needed in ("manifest.csv", "subset.zip"):
        if not (extracted_dir / needed).is_file():
            raise FileNotFoundError(f"{extracted_dir / needed}: not found; run the extract stage first")
    with open(extracted_dir / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    counts = {}
    s = params.image_size
    with zipfile.ZipFile(extracted_dir / "subset.zip") as subset, atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            split_rows = [r for r in rows if r["split"] == split]
            n = len(split_rows)
            images = np.zeros((n, 1, s, s), np.uint8)
            masks = np.zeros((n, 1, s, s), np.uint8)
            lungs = np.zeros((n, 1, s, s), np.uint8)
            has_lung = np.array([r["lung_path"] != "" for r in split_rows], dtype=bool)
            for i, r in enumerate(split_rows):
                base = f"{split}/{r['class']}"
                name = subset_member(r)
                try:
                    image = resize_image(_decode(subset.read(f"{base}/{IMAGES}/{name}")), s)
                    images[i, 0] = normalise_contrast(image, params.contrast)
                    masks[i, 0] = resize_mask(_decode(subset.read(f"{base}/{INFECTION}/{name}")), s)
                    if has_lung[i]:
                        lungs[i, 0] = resize_mask(_decode(subset.read(f"{base}/{LUNG}/{name}")), s)
                except (KeyError, OSError, zipfile.BadZipFile) as exc:
                    raise ValueError(
                        f"{extracted_dir / 'subset.zip'}: {base}/.../{name} listed in "
                        f"manifest.csv cannot be read ({exc}); rerun the extract stage"
                    ) from None
            np.savez(
                tmp / f"{split}.npz",
                images=images,
                masks=masks,
                lungs=lungs,
                ids=np.array([r["id"] for r in split_rows], dtype=str),
                classes=np.array([r["class"] for r in split_rows], dtype=str),
                # Only where a film lacks one, so the arrays of a complete source stay byte for byte the same.
                **({} if has_lung.all() else {"has_lung": has_lung}),
            )
            counts[split] = n
        unlabeled = _write_unlabeled(extracted_dir, tmp, params)
        extra = {} if unlabeled is None else {"unlabeled_count": unlabeled}
        write_json(tmp / "source.json", _source_record(extracted_dir, counts) | {"contrast": params.contrast} | extra)
    return counts


def _write_unlabeled(extracted_dir: Path, out: Path, params: PreprocessParams) -> int | None:
    """``unlabeled.npz`` (images, lungs, ids; no masks) from the extract's ``unlabeled.zip`` when it has one
    (``data.unlabeled``, covidseg.data.unlabeled); returns the film count, None when there is none."""
    csv_path = extracted_dir / "unlabeled.csv"
    if not csv_path.is_file():
        return None
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    s, n = params.image_size, len(rows)
    images, lungs = np.zeros((n, 1, s, s), np.uint8), np.zeros((n, 1, s, s), np.uint8)
    with zipfile.ZipFile(extracted_dir / "unlabeled.zip") as films:
        for i, r in enumerate(rows):
            try:
                image = resize_image(_decode(films.read(f"{IMAGES}/{r['member']}")), s)
                images[i, 0] = normalise_contrast(image, params.contrast)
                lungs[i, 0] = resize_mask(_decode(films.read(f"{LUNG}/{r['member']}")), s)
            except (KeyError, OSError, zipfile.BadZipFile) as exc:
                raise ValueError(
                    f"{extracted_dir / 'unlabeled.zip'}: {r['member']} listed in unlabeled.csv cannot be read ({exc}); "
                    "rerun the extract stage"
                ) from None
    np.savez(out / "unlabeled.npz", images=images, lungs=lungs, ids=np.array([r["id"] for r in rows], dtype=str))
    return n


SYNTHETIC_NAME = "synthetic"  # the base name of the built-in synthetic set's folder (data/raw/synthetic)


def _source_record(extracted_dir: Path, counts: dict[str, int]) -> dict:
    """Provenance of the prepared arrays; the source name is "unknown" for an extract without source.json."""
    path = extracted_dir / "source.json"
    name = json.loads(path.read_text(encoding="utf-8")).get("name", "unknown") if path.is_file() else "unknown"
    return {"data_source": name, "synthetic": name == SYNTHETIC_NAME, "split_counts": dict(counts)}
