"""The COVID-QU-Ex Kaggle layout: folder names, file-name patterns and how to find the root.

Layout (the root folder name appears twice in the Kaggle download)::

    Infection Segmentation Data/Infection Segmentation Data/
        {Train,Val,Test}/{COVID-19,Non-COVID,Normal}/{images,infection masks,lung masks}/*.png
"""

from __future__ import annotations

import re
from pathlib import Path

from covidseg.params import CLASSES

ROOT_NAME = "Infection Segmentation Data"
SPLIT_DIRS = {"train": "Train", "val": "Val", "test": "Test"}
SPLITS = tuple(SPLIT_DIRS)
CLASS_DIRS = CLASSES  # the class folders are named as the classes
IMAGES, INFECTION, LUNG = "images", "infection masks", "lung masks"
KIND_DIRS = (IMAGES, INFECTION, LUNG)
# The other half of the Kaggle archive (33,920 lung-segmentation images, no infection masks): never
# listed nor read, unless data.unlabeled asks for its COVID-19 films (covidseg.data.unlabeled).
LUNG_DATA_NAME = "Lung Segmentation Data"


def ignored_part(name: str) -> bool:
    """Whether a folder called ``name`` is skipped: the lung-segmentation half, ``__MACOSX`` or hidden."""
    return name.startswith((LUNG_DATA_NAME, "__MACOSX", "."))


def in_infection_part(folders: list[str]) -> bool:
    """Whether a file under these folder names is read as the dataset: none of them is :func:`ignored_part`."""
    return not any(ignored_part(p) for p in folders)


def in_lung_part(folders: list[str]) -> bool:
    """Whether a file under these folder names is in the archive's ``Lung Segmentation Data`` half
    (self-training's unlabeled films), and not in macOS or hidden debris."""
    return any(p.startswith(LUNG_DATA_NAME) for p in folders) and not any(
        p.startswith(("__MACOSX", ".")) for p in folders
    )


def file_name(class_dir: str, number: int) -> str:
    """The dataset's own file name for image ``number`` of a class (note spaces and parentheses)."""
    if class_dir == "COVID-19":
        return f"covid_{number}.png"
    if class_dir == "Non-COVID":
        return f"Non_COVID ({number}).png"
    if class_dir == "Normal":
        return f"Normal ({number}).png"
    raise ValueError(f"unknown class folder {class_dir!r}")


def find_roots(dirs: set[str]) -> list[str]:
    """Return every directory (POSIX path, '' for the top) that holds the split folders.

    ``dirs`` is the set of all directory paths in a tree or archive (POSIX, no trailing
    slash). A root is a directory with a ``Train``, ``Val`` or ``Test`` child that itself has
    a known class folder, so a root is found at any nesting depth and whatever its name.
    Roots under ``Lung Segmentation Data`` (the other half of the archive), ``__MACOSX`` or a
    hidden folder are ignored (see :func:`ignored_part`).
    """
    roots = set()
    for d in dirs:
        parts = d.split("/")
        if len(parts) < 2 or parts[-1] not in CLASS_DIRS or parts[-2] not in SPLIT_DIRS.values():
            continue
        if any(ignored_part(p) for p in parts):
            continue
        roots.add("/".join(parts[:-2]))
    return sorted(roots)


def is_extract_output(folder: Path) -> bool:
    """Whether ``folder`` is an extract stage's output (``manifest.csv`` beside ``subset.zip``), not a data source."""
    return (folder / "manifest.csv").is_file() and (folder / "subset.zip").is_file()


def subset_member(row: dict) -> str:
    """The file name of an extract manifest row's films in ``subset.zip`` (``member``; older extracts: the source's)."""
    return row.get("member") or row["image_path"].replace("\\", "/").rsplit("/", 1)[-1]


def case_ids(rows: list[dict]) -> list[str]:
    """The manifest rows' ids as file-name-safe case identifiers (nnU-Net's, a mask folder's): every character but
    letters, digits, ``_`` and ``-`` becomes ``_``; an id two rows share gets its split and class in front."""
    clean = [re.sub(r"[^A-Za-z0-9_-]", "_", r["id"]) for r in rows]
    counts: dict[str, int] = {}
    for c in clean:
        counts[c] = counts.get(c, 0) + 1
    ids = [
        c if counts[c] == 1 else re.sub(r"[^A-Za-z0-9_-]", "_", f"{r['split']}_{r['class']}_{c}")
        for r, c in zip(rows, clean)
    ]
    if len(set(ids)) != len(ids):
        raise ValueError("manifest.csv: case identifiers are not unique even with split and class prefixed")
    return ids
