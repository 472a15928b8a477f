"""Extract the COVID-19 subset (plus Non-COVID/Normal when asked) with a checked manifest.

Output, replaced atomically:
    ``out_dir/subset.zip``   normalised PNGs at ``{split}/{class}/{images,infection masks,lung masks}/{name}``
    ``out_dir/manifest.csv`` one row per pair taken: split, class, id, source paths, hashes, size, fractions
and ``metrics_path`` (JSON): per split the count taken, the skips by reason and infected-fraction stats.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from covidseg.atomic import atomic_dir, write_json
from covidseg.layout import IMAGES, INFECTION, LUNG, SPLIT_DIRS
from covidseg.params import DataParams
from covidseg.pngcheck import BadImageError, binarise, decode_grey, encode_png
from covidseg.sources import Source, locate_root, open_source

MANIFEST_FIELDS = [
    "split", "class", "id", "image_path", "infection_path", "lung_path",
    "image_sha256", "infection_sha256", "lung_sha256", "height", "width",
    "infected_fraction", "lung_fraction", "fixes",
]
SKIP_REASONS = (
    "unreadable", "missing_mask", "missing_image", "missing_lung_mask", "size_mismatch",
    "duplicate", "empty_covid_mask", "nonempty_negative_mask",
)


class ExtractError(ValueError):
    """A pair failed a check while ``data.on_error`` is ``fail``."""


@dataclass
class Report:
    """What extraction took, skipped and fixed, per split."""

    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLIT_DIRS})
    skips: dict[str, collections.Counter] = field(default_factory=lambda: {s: collections.Counter() for s in SPLIT_DIRS})
    fixes: dict[str, collections.Counter] = field(default_factory=lambda: {s: collections.Counter() for s in SPLIT_DIRS})
    fractions: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SPLIT_DIRS})
    messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out: dict = {}
        for split in SPLIT_DIRS:
            fr = np.asarray(self.fractions[split], dtype=np.float64)
            stats = (
                {"mean": float(fr.mean()), "median": float(np.median(fr)), "min": float(fr.min()), "max": float(fr.max())}
                if fr.size else {"mean": None, "median": None, "min": None, "max": None}
            )
            out[split] = {
                "count": int(self.counts[split]),
                "skipped": {r: int(self.skips[split][r]) for r in SKIP_REASONS},
                "fixed": dict(sorted(self.fixes[split].items())),
                "infected_fraction_covid": stats,
            }
        out["skipped_total"] = int(sum(sum(c.values()) for c in self.skips.values()))
        return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _index(source: Source, root: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """Map (split dir, class dir, kind dir) -> {file name: source path} for every PNG under the root."""
    prefix = f"{root}/" if root else ""
    index: dict[tuple[str, str, str], dict[str, str]] = collections.defaultdict(dict)
    for f in source.files:
        if not f.startswith(prefix) or not f.lower().endswith(".png"):
            continue
        parts = PurePosixPath(f[len(prefix):]).parts
        if len(parts) == 4:
            index[(parts[0], parts[1], parts[2])][parts[3]] = f
    return index


def extract(source_path: str | Path, out_dir: str | Path, metrics_path: str | Path, params: DataParams) -> Report:
    """Check every pair of the requested classes and write the subset, manifest and data metrics."""
    report = Report()
    rows: list[dict] = []
    seen_hashes: dict[str, str] = {}
    with open_source(source_path) as source, atomic_dir(out_dir) as tmp:
        root = locate_root(source)
        index = _index(source, root)
        with zipfile.ZipFile(tmp / "subset.zip", "w", compression=zipfile.ZIP_STORED) as out_zip:
            for split, split_dir in SPLIT_DIRS.items():
                for class_dir in params.classes:
                    key = (split_dir, class_dir)
                    images, masks, lungs = (index.get(key + (k,), {}) for k in (IMAGES, INFECTION, LUNG))
                    for name in sorted(set(images) | set(masks)):
                        row = _take_pair(source, split, class_dir, name, images, masks, lungs, seen_hashes, report, params)
                        if row is None:
                            continue
                        row, payload = row
                        for kind, data in payload.items():
                            out_zip.writestr(f"{split}/{class_dir}/{kind}/{name}", data)
                        rows.append(row)
        if not any(report.counts.values()):
            raise ExtractError(f"{source.location}: no usable pairs for classes {list(params.classes)}")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (tmp / "manifest.csv").write_text(buf.getvalue(), encoding="utf-8")
        write_json(metrics_path, report.to_json())
    return report


def _take_pair(source, split, class_dir, name, images, masks, lungs, seen_hashes, report, params):
    """Check one pair; return (manifest row, {kind: png bytes}) or None when skipped."""

    def skip(reason: str, message: str) -> None:
        if params.on_error == "fail":
            raise ExtractError(message)
        report.skips[split][reason] += 1
        report.messages.append(f"skipped ({reason}): {message}")

    where = f"{split}/{class_dir}/{name}"
    if name not in masks:
        return skip("missing_mask", f"{source.describe(images[name])}: image has no infection mask")
    if name not in images:
        return skip("missing_image", f"{source.describe(masks[name])}: infection mask has no image")
    if name not in lungs:
        return skip("missing_lung_mask", f"{source.describe(images[name])}: image has no lung mask")
    raw = {kind: source.read(paths[name]) for kind, paths in ((IMAGES, images), (INFECTION, masks), (LUNG, lungs))}
    paths = {IMAGES: images[name], INFECTION: masks[name], LUNG: lungs[name]}
    arrays, fixes = {}, []
    for kind, data in raw.items():
        try:
            arr, converted = decode_grey(data, source.describe(paths[kind]))
        except BadImageError as exc:
            return skip("unreadable", str(exc))
        if converted:
            fixes.append(f"converted_mode:{kind}")
        if kind != IMAGES:
            arr, binarised = binarise(arr)
            if binarised:
                fixes.append(f"binarised:{kind}")
        arrays[kind] = arr
    shapes = {k: a.shape for k, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        return skip("size_mismatch", f"{source.describe(paths[IMAGES])}: image and masks differ in size {shapes}")
    infection, lung = arrays[INFECTION] > 0, arrays[LUNG] > 0
    if class_dir == "COVID-19" and not infection.any():
        return skip("empty_covid_mask", f"{source.describe(paths[INFECTION])}: COVID-19 infection mask is empty")
    if class_dir != "COVID-19" and infection.any():
        return skip("nonempty_negative_mask", f"{source.describe(paths[INFECTION])}: {class_dir} infection mask is not empty")
    pixel_hash = hashlib.sha256(arrays[IMAGES].tobytes() + repr(arrays[IMAGES].shape).encode()).hexdigest()
    if pixel_hash in seen_hashes:
        return skip("duplicate", f"{source.describe(paths[IMAGES])}: same pixels as {seen_hashes[pixel_hash]}")
    seen_hashes[pixel_hash] = where
    for f in fixes:
        report.fixes[split][f.split(":")[0]] += 1
    fraction = float(infection.mean())
    report.counts[split] += 1
    if class_dir == "COVID-19":
        report.fractions[split].append(fraction)
    payload = {kind: raw[kind] if not any(f.endswith(kind) for f in fixes) else encode_png(arrays[kind]) for kind in raw}
    row = {
        "split": split, "class": class_dir, "id": PurePosixPath(name).stem,
        "image_path": paths[IMAGES], "infection_path": paths[INFECTION], "lung_path": paths[LUNG],
        "image_sha256": _sha256(raw[IMAGES]), "infection_sha256": _sha256(raw[INFECTION]), "lung_sha256": _sha256(raw[LUNG]),
        "height": arrays[IMAGES].shape[0], "width": arrays[IMAGES].shape[1],
        "infected_fraction": f"{fraction:.6f}", "lung_fraction": f"{float(lung.mean()):.6f}",
        "fixes": ";".join(fixes),
    }
    return row, payload
