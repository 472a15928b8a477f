"""The archive's unlabeled COVID-19 films, for self-training (``data.unlabeled: true``).

The Kaggle archive's other half holds films with lung masks and no infection masks::

    Lung Segmentation Data/Lung Segmentation Data/{Train,Val,Test}/COVID-19/{images,lung masks}/*.png

(11,956 COVID-19 films in the real archive). The infection part's films are among them under other
names, so a film is matched by its decoded pixels, never by name: every unlabeled film whose pixels
equal a film the extract stage took (of any split: val and test above all, and train, whose labels
are better than a pseudo-label) is left out, and so is the second of two equal unlabeled films. The
lung part's own Train/Val/Test split means nothing here: all of its films are unlabeled training films.

Written beside the labelled subset, only when asked (a run without them stays byte for byte the same):
``unlabeled.csv`` (one row per film kept: ``id``, ``image_path``, ``lung_path``, their SHA-256, size,
``member``) and ``unlabeled.zip`` (``images/<member>``, ``lung masks/<member>``).
"""

from __future__ import annotations

import collections
import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from covidseg.data.decode import BadImageError, encode_png, mask_to_255
from covidseg.data.films import decode_film
from covidseg.data.layout import IMAGES, LUNG, SPLIT_DIRS, in_lung_part
from covidseg.data.sources import FolderSource, Source, SourceError, ZipSource, source_kind

CLASS = "COVID-19"
FIELDS = ["id", "image_path", "lung_path", "image_sha256", "lung_sha256", "height", "width", "member"]
SKIP_REASONS = ("same_as_labelled", "duplicate", "unreadable", "size_mismatch", "missing_lung_mask")


@dataclass
class UnlabeledReport:
    """What the unlabeled extraction took and left out (``data_details.json``'s ``unlabeled``)."""

    found: int = 0
    kept: int = 0
    skips: collections.Counter = field(default_factory=collections.Counter)
    same_as_split: collections.Counter = field(default_factory=collections.Counter)  # labelled split matched
    messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "found": self.found,
            "kept": self.kept,
            "skipped": {r: self.skips[r] for r in SKIP_REASONS},
            "same_as_labelled_by_split": {s: self.same_as_split[s] for s in SPLIT_DIRS},
        }


def open_lung_part(location: str | Path) -> Source:
    """The files of the archive's ``Lung Segmentation Data`` half (a folder or a zip, read in place)."""
    location = Path(location)
    if source_kind(location) == "file":
        return ZipSource(location, lung_part=True)
    files = []
    for dirpath, dirnames, filenames in os.walk(location):
        rel = Path(dirpath).relative_to(location).parts
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("__MACOSX", ".")))
        if in_lung_part(list(rel)):
            files += [PurePosixPath(*rel, f).as_posix() for f in sorted(filenames)]
    return FolderSource(location, files)


def plan_films(source: Source) -> list[tuple[str, str, str | None]]:
    """(id, image path, lung mask path or None) of every COVID-19 film in the lung part, sorted by image path.

    The id is ``<split>_<file stem>`` (the lung part reuses names across its splits). Raises SourceError
    naming the archive when it has no such films.
    """
    images, lungs = {}, {}
    for f in source.files:
        parts = PurePosixPath(f).parts
        if len(parts) < 4 or not f.lower().endswith(".png") or parts[-1].startswith("."):
            continue
        split_dir, class_dir, kind, name = parts[-4:]
        if split_dir in SPLIT_DIRS.values() and class_dir == CLASS and kind in (IMAGES, LUNG):
            key = ("/".join(parts[:-4]), split_dir, name)
            (images if kind == IMAGES else lungs)[key] = f
    if not images:
        raise SourceError(
            f"{source.location}: data.unlabeled is true but there is no 'Lung Segmentation Data/"
            f"{{{','.join(SPLIT_DIRS.values())}}}/{CLASS}/images/*.png' in it (the Kaggle archive's other half); "
            "set data.unlabeled: false or point data.source at the whole archive"
        )
    return [
        (f"{key[1]}_{PurePosixPath(key[2]).stem}", image, lungs.get(key))
        for key, image in sorted(images.items(), key=lambda kv: kv[1])
    ]


def file_sha256(data: bytes) -> str:
    """SHA-256 (hex) of a file's bytes, as the manifests record it."""
    return hashlib.sha256(data).hexdigest()


def pixel_hash(image) -> str:
    """The hash films are matched by (duplicates in extract, labelled twins here): SHA-256 of the decoded uint8
    (H, W) pixels and their shape."""
    return file_sha256(image.tobytes() + repr(image.shape).encode())


def collect(
    location: str | Path, labelled: dict[str, tuple[str, str]], out_dir: Path
) -> tuple[list[dict], UnlabeledReport]:
    """Read the lung part's COVID-19 films, leave out those equal to a labelled film, write ``unlabeled.zip``.

    ``labelled``: pixel hash -> (split, where) of every film the extract stage took. A bad film is skipped
    and counted (its message kept), never fatal: the labelled subset is what a run stands on.
    Returns the manifest rows (:data:`FIELDS`) and the report.
    """
    report = UnlabeledReport()
    rows: list[dict] = []
    seen: set[str] = set()
    with open_lung_part(location) as source, zipfile.ZipFile(out_dir / "unlabeled.zip", "w") as out_zip:
        plan = plan_films(source)
        report.found = len(plan)
        for film_id, image_rel, lung_rel in plan:

            def skip(reason: str, message: str) -> None:
                report.skips[reason] += 1
                report.messages.append(f"unlabeled film skipped ({reason}): {message}")

            if lung_rel is None:
                skip("missing_lung_mask", f"{source.describe(image_rel)}: no lung mask of the same name")
                continue
            try:
                raw = {IMAGES: source.read(image_rel), LUNG: source.read(lung_rel)}
                image, image_mode = decode_film(raw[IMAGES], source.describe(image_rel))
                lung, lung_mode = decode_film(raw[LUNG], source.describe(lung_rel))
            except (BadImageError, OSError) as exc:
                skip("unreadable", str(exc))
                continue
            if lung.shape != image.shape:
                skip(
                    "size_mismatch",
                    f"{source.describe(image_rel)}: image is {image.shape[1]}x{image.shape[0]} but its lung mask "
                    f"is {lung.shape[1]}x{lung.shape[0]}",
                )
                continue
            digest = pixel_hash(image)
            if digest in labelled:
                split, where = labelled[digest]
                report.same_as_split[split] += 1
                skip("same_as_labelled", f"{source.describe(image_rel)}: same pixels as the labelled film {where}")
                continue
            if digest in seen:
                skip("duplicate", f"{source.describe(image_rel)}: same pixels as an unlabeled film already taken")
                continue
            seen.add(digest)
            lung, changed = mask_to_255(lung)
            member = f"{film_id}.png"
            # the source's PNG bytes where they are already 8-bit grey {0, 255}; else the decoded pixels
            out_zip.writestr(
                stored_member(f"{IMAGES}/{member}"), raw[IMAGES] if image_mode == "L" else encode_png(image)
            )
            keep_lung = lung_mode == "L" and not changed
            out_zip.writestr(stored_member(f"{LUNG}/{member}"), raw[LUNG] if keep_lung else encode_png(lung))
            rows.append(
                {
                    "id": film_id,
                    "image_path": image_rel,
                    "lung_path": lung_rel,
                    "image_sha256": file_sha256(raw[IMAGES]),
                    "lung_sha256": file_sha256(raw[LUNG]),
                    "height": image.shape[0],
                    "width": image.shape[1],
                    "member": member,
                }
            )
    report.kept = len(rows)
    return rows, report


def stored_member(name: str) -> zipfile.ZipInfo:
    """A stored zip entry with a fixed timestamp, so the same films give a byte-identical zip (subset, unlabeled)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info
