"""The extracted subset as an nnU-Net v2 raw dataset, with covidseg's own train/val split as fold 0.

So nnU-Net, the field's reference baseline, trains on exactly the films covidseg trains on and is
tested on the same test films (nnU-Net's documentation/dataset_format.md and manual splits):

    OUT/nnUNet_raw/DatasetNNN_Name/
        dataset.json          channel_names {"0": "X-ray"}, labels {"background": 0, "infection": 1},
                              numTraining (train + val films), file_ending ".png", and provenance
        imagesTr/<id>_0000.png   the train and val films, 8-bit grey, as extracted (one channel: _0000)
        labelsTr/<id>.png        their infection masks, uint8 0/1 (binarised at 0.5, consecutive labels)
        imagesTs/<id>_0000.png   the test films (nnU-Net does not read them; predict them after training)
    OUT/nnUNet_preprocessed/DatasetNNN_Name/splits_final.json
                              [{"train": [train ids], "val": [val ids]}]: fold 0 is covidseg's split
    OUT/test_labels/DatasetNNN_Name/<id>.png   the test films' infection masks (0/255), to score nnU-Net's
                              test predictions

``nnUNet_raw/DatasetNNN_Name`` and ``test_labels/DatasetNNN_Name`` are replaced atomically; in
``nnUNet_preprocessed/DatasetNNN_Name`` only ``splits_final.json`` is written, so nnU-Net's plans and
preprocessed arrays there survive a re-export.

Films are PNGs, lossless, at their extracted size (COVID-QU-Ex: 256 x 256), so nnU-Net's
NaturalImage2DIO reads them as 2-D images. Case ids are the manifest's ids with every character but
letters, digits, ``_`` and ``-`` replaced by ``_`` ("Normal (1)" -> "Normal__1_"); where two splits or
classes share an id the split and class are prefixed, so every case is unique.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from covidseg.atomic import atomic_dir, write_json
from covidseg.data.layout import IMAGES, INFECTION, case_ids, subset_member

CHANNEL = "X-ray"  # not "CT": nnU-Net then z-scores each film, the right normalisation for radiographs


class NnunetExportError(ValueError):
    """The extracted subset cannot be exported (the message names the file)."""


def export_nnunet(extracted_dir: str | Path, out: str | Path, dataset_id: int = 501, name: str = "COVIDQUEx") -> dict:
    """Write the nnU-Net v2 raw dataset and fold-0 split of the extract stage's ``extracted_dir`` under ``out``.

    ``dataset_id``: nnU-Net's three-digit id (1-999; custom datasets conventionally from 500).
    ``out/nnUNet_raw/DatasetNNN_name`` and its preprocessed split are replaced atomically.
    Returns {"dataset": folder name, "train", "val", "test": counts}.
    """
    extracted_dir, out = Path(extracted_dir), Path(out)
    if not 1 <= dataset_id <= 999:
        raise NnunetExportError(f"dataset id {dataset_id}: nnU-Net ids are three-digit integers, 1-999")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise NnunetExportError(f"dataset name {name!r}: use letters, digits, '_' and '-' only")
    manifest, subset = extracted_dir / "manifest.csv", extracted_dir / "subset.zip"
    for needed in (manifest, subset):
        if not needed.is_file():
            raise NnunetExportError(f"{needed}: not found; run the extract stage (dvc repro extract) first")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cases = case_ids(rows)
    folder = f"Dataset{dataset_id:03d}_{name}"
    counts = {split: sum(r["split"] == split for r in rows) for split in ("train", "val", "test")}
    with (
        zipfile.ZipFile(subset) as z,
        atomic_dir(out / "nnUNet_raw" / folder) as raw,
        atomic_dir(out / "test_labels" / folder) as test_labels,
    ):
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (raw / sub).mkdir()
        for row, case in zip(rows, cases):
            image, mask = _pair(z, subset, row)
            training = row["split"] in ("train", "val")
            _save(raw / ("imagesTr" if training else "imagesTs") / f"{case}_0000.png", image)
            if training:
                _save(raw / "labelsTr" / f"{case}.png", mask.astype(np.uint8))
            else:
                _save(test_labels / f"{case}.png", np.where(mask, 255, 0).astype(np.uint8))
        dataset = {
            "channel_names": {"0": CHANNEL},
            "labels": {"background": 0, "infection": 1},
            "numTraining": counts["train"] + counts["val"],
            "file_ending": ".png",
            "name": name,
            "description": "COVID-QU-Ex infection segmentation, the films covidseg's extract stage took; fold 0 of "
            "splits_final.json is covidseg's train/val split, imagesTs its test split",
            "reference": "Tahir et al., COVID-QU-Ex (Kaggle anasmohammedtahir/covidqu)",
            "licence": "CC BY-SA 4.0",
        }
        (raw / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    # Only the split file: nnU-Net keeps its plans and preprocessed arrays in this folder, and a re-export must
    # not delete them (rerun its preprocessing when the films changed).
    fold = {s: [c for r, c in zip(rows, cases) if r["split"] == s] for s in ("train", "val")}
    write_json(out / "nnUNet_preprocessed" / folder / "splits_final.json", [fold])
    return {"dataset": folder, **counts}


def _pair(z: zipfile.ZipFile, subset: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W) film and bool (H, W) infection mask (>= 128) of a manifest row."""
    base, file = f"{row['split']}/{row['class']}", subset_member(row)
    try:
        images = [Image.open(io.BytesIO(z.read(f"{base}/{kind}/{file}"))).convert("L") for kind in (IMAGES, INFECTION)]
    except (KeyError, OSError, zipfile.BadZipFile) as exc:
        raise NnunetExportError(f"{subset}: {base}/.../{file} listed in manifest.csv cannot be read ({exc})") from None
    image, mask = (np.asarray(i, dtype=np.uint8) for i in images)
    if image.shape != mask.shape:
        raise NnunetExportError(f"{subset}: {base}/{file}: film {image.shape} and mask {mask.shape} differ in size")
    return image, mask >= 128


def _save(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")
