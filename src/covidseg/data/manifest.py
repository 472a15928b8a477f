"""A user's own annotated films as the data source: a CSV manifest or a MONAI-style JSON datalist.

CSV (``manifest.csv``, UTF-8), one row per film; paths relative to the CSV (or absolute):
    image      the film: PNG, JPEG, 16-bit PNG/TIFF or DICOM (whatever ``covidseg predict`` reads)
    mask       its infection mask: 0/255 or 0/1, at any size with the film's aspect ratio
    lung_mask  optional: its lung mask (severity per lung needs one; the lung head learns only from these)
    split      optional: train, val or test (every row or none)
    class      optional: COVID-19 (the default), Non-COVID or Normal
    patient    optional: a patient id; the seeded split keeps a patient's films in one split
(``label`` and ``lung`` are read as ``mask`` and ``lung_mask``.)

JSON datalist (MONAI's decathlon format, ``load_decathlon_datalist``): ``{"training": [...],
"validation": [...], "test": [...]}``, each a list of ``{"image", "label", "lung", "class", "patient"}``
(``lung``, ``class``, ``patient`` optional), paths relative to the JSON file. With ``training``
alone, the seeded split applies.

Without a split: per class, the patients (or the films, without a patient column) in path order
are shuffled with ``data.split_seed`` and cut at ``1 - data.val_fraction - data.test_fraction`` /
``data.val_fraction`` / ``data.test_fraction``; extraction records the result in its manifest.csv
and ``source.json``.

As ``data.source`` in the pipeline: the folder holding ``manifest.csv`` or ``datalist.json`` at its
top, with every listed file inside it, so that DVC hashes the films too and a film edited in place
reruns extract (the check stage refuses a bare manifest file and a file outside the folder).
``covidseg evaluate`` and ``covidseg export-nnunet`` also take the manifest file itself.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from covidseg.data.layout import SPLITS, is_extract_output
from covidseg.data.sources import FolderSource, SourceError
from covidseg.params import CLASSES, DataParams

MANIFEST_NAMES = ("manifest.csv", "datalist.json")
MANIFEST_SUFFIXES = (".csv", ".json")
CSV_COLUMNS = ("image", "mask", "lung_mask", "split", "class", "patient")
COLUMN_ALIASES = {"label": "mask", "lung": "lung_mask"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}
DATALIST_SPLITS = {"training": "train", "validation": "val", "test": "test"}


class ManifestError(SourceError):
    """The manifest itself is unusable (columns, values, format); the message names the file and the row."""


@dataclass(frozen=True)
class Entry:
    """One listed film: paths as written (relative to the manifest, or absolute), split "" when not given."""

    where: str  # "manifest.csv line 3" or "datalist.json training[2]", for messages
    image: str
    mask: str
    lung: str  # "" without a lung mask
    split: str
    class_name: str
    patient: str


@dataclass(frozen=True)
class Planned:
    """A film to extract: split, class, its name in the subset (``<id>.png``), listed paths, and a
    (reason, message) ``problem`` when a listed file is missing."""

    split: str
    class_name: str
    name: str
    image: str
    mask: str
    lung: str
    problem: tuple[str, str] | None


def find_manifest(folder: Path) -> Path | None:
    """The manifest file at the top of ``folder`` (one of :data:`MANIFEST_NAMES`), or None.

    Raises ManifestError when the folder holds both.
    """
    found = [folder / n for n in MANIFEST_NAMES if (folder / n).is_file()]
    if len(found) > 1:
        raise ManifestError(f"{folder}: holds both {' and '.join(MANIFEST_NAMES)}; keep one")
    return found[0] if found else None


def read_entries(path: Path) -> list[Entry]:
    """Every film ``path`` (a ``.csv`` or ``.json`` manifest) lists; raises ManifestError naming the file and row."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    entries = _read_datalist(path, text) if path.suffix.lower() == ".json" else _read_csv(path, text)
    if not entries:
        raise ManifestError(f"{path}: lists no films")
    given = {bool(e.split) for e in entries}
    if len(given) > 1:
        first = next(e for e in entries if not e.split)
        raise ManifestError(f"{first.where}: no split, while other rows give one; give every row a split or none")
    return entries


def _read_csv(path: Path, text: str) -> list[Entry]:
    reader = csv.DictReader(text.splitlines())
    header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    columns = [COLUMN_ALIASES.get(h, h) for h in header]
    unknown = [h for h, c in zip(header, columns) if c not in CSV_COLUMNS]
    if unknown:
        raise ManifestError(
            f"{path}: unknown column(s) {unknown}; known ones are {list(CSV_COLUMNS)} "
            f"({', '.join(f'{a} for {c}' for a, c in COLUMN_ALIASES.items())} also read)"
        )
    missing = [c for c in ("image", "mask") if c not in columns]
    if missing:
        raise ManifestError(f"{path}: no {' and no '.join(repr(c) for c in missing)} column (columns: {header})")
    if len(set(columns)) != len(columns):
        raise ManifestError(f"{path}: a column appears twice (columns: {header})")
    entries = []
    for line, raw in enumerate(reader, start=2):
        if not any((v or "").strip() for v in raw.values() if isinstance(v, str)):
            continue  # a blank line
        if None in raw:
            raise ManifestError(f"{path} line {line}: more values than the {len(header)} columns")
        row = {c: (raw[h] or "").strip() for h, c in zip(reader.fieldnames or [], columns)}
        entries.append(_entry(f"{path} line {line}", row.get("image", ""), row.get("mask", ""), row))
    return entries


def _read_datalist(path: Path, text: str) -> list[Entry]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or not any(k in doc for k in DATALIST_SPLITS):
        raise ManifestError(f"{path}: expected a MONAI datalist, an object with {list(DATALIST_SPLITS)} lists")
    seeded = set(doc) & set(DATALIST_SPLITS) == {"training"}
    entries = []
    for key, split in DATALIST_SPLITS.items():
        items = doc.get(key, [])
        if not isinstance(items, list):
            raise ManifestError(f'{path}: \'{key}\' must be a list of {{"image", "label"}} objects')
        for i, item in enumerate(items):
            where = f"{path} {key}[{i}]"
            if not isinstance(item, dict):
                raise ManifestError(f"{where}: expected an object with 'image' and 'label', got {item!r:.80}")
            row = {k: item.get(k) for k in ("lung", "class", "patient")}
            bad = [k for k, v in row.items() if v is not None and not isinstance(v, str)]
            if bad or not all(isinstance(item.get(k, ""), str) for k in ("image", "label")):
                raise ManifestError(f"{where}: 'image', 'label', {', '.join(repr(k) for k in row)} must be text")
            row = {"lung_mask": row["lung"] or "", "class": row["class"] or "", "patient": row["patient"] or ""}
            row["split"] = "" if seeded else split
            entries.append(_entry(where, item.get("image", ""), item.get("label", ""), row))
    return entries


def _entry(where: str, image: str, mask: str, row: dict) -> Entry:
    """An Entry from one row's values, or ManifestError naming ``where``."""
    if not image or not mask:
        raise ManifestError(f"{where}: {'image' if not image else 'mask'} is empty; every film needs an infection mask")
    split = row.get("split", "")
    if split and split.lower() not in SPLIT_NAMES:
        raise ManifestError(f"{where}: split {split!r} is not one of train, val, test")
    class_name = row.get("class", "") or "COVID-19"
    if class_name not in CLASSES:
        raise ManifestError(f"{where}: class {class_name!r} is not one of {list(CLASSES)}")
    image, mask, lung = (p.replace("\\", "/") for p in (image, mask, row.get("lung_mask", "")))  # Windows paths
    return Entry(
        where,
        image,
        mask,
        lung,
        SPLIT_NAMES.get(split.lower(), ""),
        class_name,
        row.get("patient", ""),
    )


def seeded_splits(entries: list[Entry], val_fraction: float, test_fraction: float, seed: int) -> list[Entry]:
    """``entries`` with a split each: per class, patients (or films) in path order, shuffled, cut by the fractions.

    A class's ``n`` groups give ``round(n * test_fraction)`` to test, ``round(n * val_fraction)`` to val and
    the rest to train; the shuffle is ``numpy.random.default_rng(seed)``, one permutation per class in
    :data:`covidseg.params.CLASSES` order, so the split does not depend on the manifest's row order.
    """
    rng = np.random.default_rng(seed)
    split_of: dict[tuple[str, str], str] = {}
    for class_name in CLASSES:
        keys = sorted({e.patient or e.image for e in entries if e.class_name == class_name})
        order = [keys[i] for i in rng.permutation(len(keys))]
        n_test, n_val = round(len(keys) * test_fraction), round(len(keys) * val_fraction)
        for k, key in enumerate(order):
            split_of[(class_name, key)] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return [replace(e, split=split_of[(e.class_name, e.patient or e.image)]) for e in entries]


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` with ``-1``, ``-2``, ... added to each one an earlier one took (case-insensitively), as
    ``covidseg predict`` names its outputs and a manifest its films."""
    used: set[str] = set()
    out = []
    for base in names:
        name, k = base, 0
        while name.lower() in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name.lower())
        out.append(name)
    return out


class ManifestSource(FolderSource):
    """The films a manifest lists, read from disk; ``location`` is what ``data.source`` names.

    ``folder``: where relative paths start (the manifest's folder). ``entries``: as listed, split "" when
    not given. ``bare``: ``location`` is the manifest file itself rather than its folder.
    """

    resize_masks = True  # a mask at another size than its film (same aspect ratio) is resized to it

    def __init__(self, location: Path, manifest: Path):
        self.manifest, self.folder, self.bare = manifest, manifest.parent, location == manifest
        self.entries = read_entries(manifest)
        super().__init__(location, sorted({p for e in self.entries for p in (e.image, e.mask, e.lung) if p}))

    def path(self, rel: str) -> Path:
        return self.folder / rel

    def describe(self, rel: str) -> str:
        return str(self.path(rel))

    def outside(self) -> list[str]:
        """Listed paths that do not lie inside the manifest's folder (DVC would not see them change)."""
        top = Path(os.path.abspath(self.folder))
        return [f for f in self.files if not Path(os.path.abspath(self.path(f))).is_relative_to(top)]

    def split_entries(self, params: DataParams, unsplit: str = "") -> tuple[list[Entry], bool]:
        """(every entry with its split, whether the split was seeded here); ``unsplit``: the split of every
        film of a manifest without splits, instead of the seeded split (external validation scores all)."""
        if self.entries[0].split:
            return self.entries, False
        if unsplit:
            return [replace(e, split=unsplit) for e in self.entries], False
        return seeded_splits(self.entries, params.val_fraction, params.test_fraction, params.split_seed), True

    def plan(self, params: DataParams, unsplit: str = "") -> tuple[list[Planned], bool]:
        """(one :class:`Planned` per film of ``params.classes``, in split order then manifest order; whether
        the split was seeded here). A listed file that is missing or not a file is a ``missing_*`` problem.
        ``unsplit``: see :meth:`split_entries`."""
        entries, seeded = self.split_entries(params, unsplit)
        ids, planned = self.case_ids(), []
        for split in SPLITS:  # extraction's order: of two equal films the later split's is dropped
            for e, case in zip(entries, ids):
                if e.split != split or e.class_name not in params.classes:
                    continue
                problem = None
                for kind, rel, reason in (
                    ("image", e.image, "missing_image"),
                    ("infection mask", e.mask, "missing_mask"),
                    ("lung mask", e.lung, "missing_lung_mask"),
                ):
                    if rel and not self.path(rel).is_file():
                        what = "is not a file" if self.path(rel).exists() else "not found"
                        problem = (reason, f"{e.where}: {kind} {rel!r} {what} ({self.describe(rel)})")
                        break
                planned.append(Planned(split, e.class_name, f"{case}.png", e.image, e.mask, e.lung, problem))
        return planned, seeded

    def case_ids(self) -> list[str]:
        """One id per entry, in manifest order: the film's file stem, made unique as predict names its outputs."""
        return unique_names([PurePosixPath(e.image).stem or "film" for e in self.entries])


def open_manifest(location: Path) -> ManifestSource | None:
    """A ManifestSource when ``location`` is a manifest file or a folder with one at its top, else None."""
    if location.is_dir():
        if is_extract_output(location):
            return None  # its manifest.csv is extraction's own record, not a user's manifest
        manifest = find_manifest(location)
        return ManifestSource(location, manifest) if manifest else None
    if location.suffix.lower() in MANIFEST_SUFFIXES:
        return ManifestSource(location, location)
    return None
