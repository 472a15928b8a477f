"""Extract the COVID-19 subset (plus Non-COVID/Normal when asked), checking every file.

Output, all or nothing: a failed call writes nothing and leaves the targets as it found them
(under ``dvc repro`` DVC has already removed them before the stage ran: docs/recovery.md):
    ``out_dir/subset.zip``   8-bit grey PNGs at ``{split}/{class}/{images,infection masks,lung masks}/{name}``;
                             files that needed no fix are copied byte for byte, fixed ones re-encoded
    ``out_dir/manifest.csv`` one row per triplet taken: split, class, id, source paths, SHA-256 of
                             the source files, height, width (pixels), infected and lung fractions, fixes,
                             the file name in subset.zip (``member``); a manifest's film without a lung
                             mask has empty lung fields and no lung member
    ``out_dir/skipped.csv``  one row per triplet skipped: split, class, name, reason, message
    ``out_dir/source.json``  ``{"name": the source folder's or archive's base name}``; for a manifest
                             (covidseg.data.manifest) also ``split``: ``manifest`` (given) or ``seeded``
                             with ``split_seed``, ``val_fraction``, ``test_fraction`` (also in the details)
    ``metrics_path`` (JSON)  images taken per split and triplets skipped (the DVC metrics)
    ``details_path`` (JSON)  per split: the count taken, counts per class, skips by reason, fixes
                             by kind and infected-fraction stats of the COVID-19 pairs

Checks (see docs/data.md): unreadable or truncated files, an image without masks or a mask
without image, sizes that differ within a triplet, a COVID-19 infection mask that is empty
(or a Non-COVID/Normal one that is not), and an image whose pixels repeat an earlier one
(in split order train, val, test, so a leak into val/test is what gets dropped). With
``data.on_error: skip`` such a triplet is skipped and counted; with ``fail`` the first one
stops the run with an :class:`ExtractError` naming the file. Non-grey or 16-bit files are
converted to 8-bit grey and masks with values other than 0/255 binarised at 0.5 (> 127)
under both policies, and counted.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import multiprocessing
import multiprocessing.connection
import os
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from covidseg.atomic import atomic_dir, atomic_path, details_path_for, write_json
from covidseg.data.arrays import resize_mask
from covidseg.data.decode import BadImageError, encode_png, mask_to_255
from covidseg.data.films import DICOM_MODE, decode_film
from covidseg.data.layout import IMAGES, INFECTION, LUNG, SPLIT_DIRS
from covidseg.data.manifest import ManifestSource
from covidseg.data.sources import Source, layout_index, locate_root, open_source
from covidseg.data.unlabeled import FIELDS as UNLABELED_FIELDS
from covidseg.data.unlabeled import collect as collect_unlabeled
from covidseg.data.unlabeled import file_sha256, pixel_hash, stored_member
from covidseg.params import DataParams

MANIFEST_FIELDS = [
    "split",
    "class",
    "id",
    "image_path",
    "infection_path",
    "lung_path",
    "image_sha256",
    "infection_sha256",
    "lung_sha256",
    "height",
    "width",
    "infected_fraction",
    "lung_fraction",
    "fixes",
    "member",
]
SKIPPED_FIELDS = ["split", "class", "name", "reason", "message"]
SKIP_REASONS = (
    "unreadable",
    "missing_mask",
    "missing_image",
    "missing_lung_mask",
    "size_mismatch",
    "duplicate",
    "empty_covid_mask",
    "nonempty_negative_mask",
)
FIX_KINDS = ("converted_mode", "binarised", "resized")
# A manifest's mask may differ in size from its film, not in shape: aspect ratios within this share.
ASPECT_TOLERANCE = 0.02
# Below this many triplets the worker pool costs more than it saves.
PARALLEL_MIN = 256


class ExtractError(ValueError):
    """A triplet failed a check while ``data.on_error`` is ``fail``, or nothing usable was found."""


@dataclass(frozen=True)
class TripletTask:
    """One complete triplet to check: source paths (POSIX, relative to the source's top); ``lung`` "" for a
    manifest's film without a lung mask; ``name`` the file name in the subset."""

    split: str
    class_dir: str
    name: str
    image: str
    infection: str
    lung: str


@dataclass
class Checked:
    """The outcome of :func:`check_triplet`: a skip ``reason`` and ``message``, or the data to keep."""

    task: TripletTask
    reason: str | None = None
    message: str = ""
    payload: dict[str, bytes] = field(default_factory=dict)  # kind -> PNG bytes to store
    sha256: dict[str, str] = field(default_factory=dict)  # kind -> hash of the source file
    pixel_hash: str = ""  # hash of the decoded image pixels
    shape: tuple[int, int] = (0, 0)  # (height, width) in pixels
    infected_fraction: float = 0.0  # share of infection-mask pixels set
    lung_fraction: float | None = 0.0  # None without a lung mask
    fixes: list[str] = field(default_factory=list)  # "converted_mode:images", "binarised:lung masks", ...
    notes: list[str] = field(default_factory=list)  # one message per fix, naming the file


@dataclass
class ExtractReport:
    """What extraction took, skipped and fixed, per split."""

    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLIT_DIRS})
    class_counts: dict[str, collections.Counter] = field(
        default_factory=lambda: {s: collections.Counter() for s in SPLIT_DIRS}
    )
    skips: dict[str, collections.Counter] = field(
        default_factory=lambda: {s: collections.Counter() for s in SPLIT_DIRS}
    )
    fixes: dict[str, collections.Counter] = field(
        default_factory=lambda: {s: collections.Counter() for s in SPLIT_DIRS}
    )
    fractions: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SPLIT_DIRS})
    messages: list[str] = field(default_factory=list)
    skipped_rows: list[dict] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return int(sum(sum(c.values()) for c in self.skips.values()))

    def headline(self) -> dict:
        """The ``metrics/data.json`` document (declared as DVC metrics): images per split and pairs skipped."""
        return {
            **{f"{split}_images": int(self.counts[split]) for split in SPLIT_DIRS},
            "skipped_total": self.skipped_total,
        }

    def to_json(self) -> dict:
        """The ``metrics/data_details.json`` document; fractions are shares of the image area, in [0, 1]."""
        out: dict = {}
        for split in SPLIT_DIRS:
            fr = np.asarray(self.fractions[split], dtype=np.float64)
            stats = (
                {
                    "mean": float(fr.mean()),
                    "median": float(np.median(fr)),
                    "min": float(fr.min()),
                    "max": float(fr.max()),
                }
                if fr.size
                else {"mean": None, "median": None, "min": None, "max": None}
            )
            out[split] = {
                "count": int(self.counts[split]),
                "classes": {c: int(n) for c, n in sorted(self.class_counts[split].items())},
                "skipped": {r: int(self.skips[split][r]) for r in SKIP_REASONS},
                "fixed": {k: int(self.fixes[split][k]) for k in FIX_KINDS},
                "infected_fraction_covid": stats,
            }
        out["skipped_total"] = self.skipped_total
        return out


def default_workers() -> int:
    """Worker processes for decoding: ``$COVIDSEG_WORKERS`` if set, else the usable CPUs, at most 4."""
    env = os.environ.get("COVIDSEG_WORKERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"COVIDSEG_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def plan_triplets(
    source: Source, root: str, classes: tuple[str, ...]
) -> list[TripletTask | tuple[str, str, str, str, str]]:
    """Every triplet in output order: a TripletTask, or (split, class, name, reason, message) when a file is missing."""
    index = layout_index(source, root)
    plan: list = []
    for split, split_dir in SPLIT_DIRS.items():
        for class_dir in classes:
            images, masks, lungs = (index.get((split_dir, class_dir, k), {}) for k in (IMAGES, INFECTION, LUNG))
            folder = f"{root}/{split_dir}/{class_dir}".lstrip("/")
            for name in sorted(set(images) | set(masks) | set(lungs)):
                if name not in images:
                    have = masks.get(name) or lungs[name]
                    kind = "infection mask" if name in masks else "lung mask"
                    plan.append(
                        (
                            split,
                            class_dir,
                            name,
                            "missing_image",
                            f"{source.describe(have)}: {kind} has no image (expected {folder}/{IMAGES}/{name})",
                        )
                    )
                elif name not in masks:
                    plan.append(
                        (
                            split,
                            class_dir,
                            name,
                            "missing_mask",
                            f"{source.describe(images[name])}: image has no infection mask (expected {folder}/{INFECTION}/{name})",
                        )
                    )
                elif name not in lungs:
                    plan.append(
                        (
                            split,
                            class_dir,
                            name,
                            "missing_lung_mask",
                            f"{source.describe(images[name])}: image has no lung mask (expected {folder}/{LUNG}/{name})",
                        )
                    )
                else:
                    plan.append(TripletTask(split, class_dir, name, images[name], masks[name], lungs[name]))
    return plan


def plan_manifest(source: ManifestSource, params: DataParams, unsplit: str = "") -> tuple[list, dict]:
    """(the plan :func:`plan_triplets` would give, for a manifest's films; how the split was made)."""
    planned, seeded = source.plan(params, unsplit)
    plan = [
        (p.split, p.class_name, p.name, *p.problem)
        if p.problem
        else TripletTask(p.split, p.class_name, p.name, p.image, p.mask, p.lung)
        for p in planned
    ]
    record = {"split": f"all films in {unsplit} (the manifest gives no split)" if unsplit else "manifest"}
    if seeded:
        record = {
            "split": "seeded",
            "split_seed": params.split_seed,
            "val_fraction": params.val_fraction,
            "test_fraction": params.test_fraction,
        }
    return plan, record


def check_triplet(source: Source, task: TripletTask) -> Checked:
    """Read, decode and check one triplet; every file is decoded exactly once.

    Films in any format :func:`covidseg.data.films.decode_film` reads; masks 0/255, or 0/1 (scaled to 0/255),
    others binarised at 0.5. A manifest's mask at another size than its film but with its aspect ratio
    (within :data:`ASPECT_TOLERANCE`) is resized to the film (bilinear, then > 0.5) and counted as fixed.
    """
    paths = {IMAGES: task.image, INFECTION: task.infection, LUNG: task.lung}
    paths = {k: v for k, v in paths.items() if v}
    out = Checked(task)
    raw, arrays = {}, {}
    for kind, rel in paths.items():
        where = source.describe(rel)
        try:
            raw[kind] = source.read(rel)
            arr, mode = decode_film(raw[kind], where)
        except BadImageError as exc:
            out.reason, out.message = "unreadable", str(exc)
            return out
        except OSError as exc:
            out.reason, out.message = "unreadable", f"{where}: cannot read file ({exc})"
            return out
        if mode != "L":
            out.fixes.append(f"converted_mode:{kind}")
            what = "DICOM film decoded" if mode == DICOM_MODE else f"mode {mode} converted"
            out.notes.append(f"{where}: {what} to 8-bit grey")
        if kind != IMAGES:
            arr, note = mask_to_255(arr)
            if note:
                out.fixes.append(f"binarised:{kind}")
                out.notes.append(f"{where}: {note}")
        arrays[kind] = arr
    shape = arrays[IMAGES].shape
    for kind in [k for k, a in arrays.items() if a.shape != shape and source.resize_masks]:
        h, w = arrays[kind].shape
        if abs((w / h) / (shape[1] / shape[0]) - 1) <= ASPECT_TOLERANCE:
            arrays[kind] = resize_mask(arrays[kind], shape[0], shape[1]) * np.uint8(255)
            out.fixes.append(f"resized:{kind}")
            out.notes.append(
                f"{source.describe(paths[kind])}: {w}x{h} mask resized to its film's {shape[1]}x{shape[0]}"
            )
    odd = [f"{source.describe(paths[k])} is {a.shape[1]}x{a.shape[0]}" for k, a in arrays.items() if a.shape != shape]
    if odd:
        out.reason = "size_mismatch"
        out.message = f"{source.describe(paths[IMAGES])}: image is {shape[1]}x{shape[0]} but " + ", ".join(odd)
        return out
    infection = arrays[INFECTION] > 0
    if task.class_dir == "COVID-19" and not infection.any():
        out.reason, out.message = (
            "empty_covid_mask",
            f"{source.describe(paths[INFECTION])}: COVID-19 infection mask is empty",
        )
        return out
    if task.class_dir != "COVID-19" and infection.any():
        out.reason = "nonempty_negative_mask"
        out.message = f"{source.describe(paths[INFECTION])}: {task.class_dir} infection mask is not empty"
        return out
    fixed_kinds = {f.split(":", 1)[1] for f in out.fixes}
    out.payload = {k: encode_png(arrays[k]) if k in fixed_kinds else raw[k] for k in paths}
    out.sha256 = {k: file_sha256(raw[k]) for k in paths}
    out.pixel_hash = pixel_hash(arrays[IMAGES])
    out.shape = (int(shape[0]), int(shape[1]))
    out.infected_fraction = float(infection.mean())
    out.lung_fraction = float((arrays[LUNG] > 0).mean()) if LUNG in arrays else None
    return out


_WORKER_SOURCE: Source | None = None


def _exit_with_parent() -> None:
    """In a pool worker: exit as soon as the parent process dies.

    A pool worker waits on its task queue forever, so a parent killed outright (SIGKILL,
    OOM killer) would otherwise leave it behind; the parent's sentinel becomes ready when
    the parent goes.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(location: str) -> None:
    global _WORKER_SOURCE
    _exit_with_parent()
    _WORKER_SOURCE = open_source(location)


def _check_in_worker(task: TripletTask) -> Checked:
    assert _WORKER_SOURCE is not None
    return check_triplet(_WORKER_SOURCE, task)


@contextlib.contextmanager
def _checked(source: Source, tasks: list[TripletTask], workers: int) -> Iterator[Iterator[Checked]]:
    """Yield an iterator of :func:`check_triplet` results in task order, from a process pool when it pays."""
    if workers <= 1 or len(tasks) < PARALLEL_MIN:
        yield (check_triplet(source, t) for t in tasks)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(source.location),),
    )
    try:
        yield pool.map(_check_in_worker, tasks, chunksize=max(1, min(32, len(tasks) // (8 * workers))))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def extract(
    source_path: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    params: DataParams,
    workers: int | None = None,
    details_path: str | Path | None = None,
    required_splits: tuple[str, ...] | None = None,
    unsplit: str = "",
) -> ExtractReport:
    """Check every triplet of ``params.classes`` and write the subset, manifest, skip list and data metrics.

    ``workers``: processes that decode and check (default :func:`default_workers`); the
    outputs do not depend on it. Raises SourceError when the source or its layout is not
    found, ExtractError on the first bad triplet under ``on_error: fail`` or when a split
    ends up without COVID-19 pairs; then nothing is written and the targets are left as they were.
    ``metrics_path`` gets :meth:`ExtractReport.headline`, ``details_path`` (default:
    ``atomic.details_path_for(metrics_path)``) :meth:`ExtractReport.to_json`. ``required_splits``: the
    splits that must hold COVID-19 pairs (default: all three, as training needs; external validation
    needs only the one it scores). ``unsplit``: a manifest without a split puts every film in this split
    instead of the seeded split (external validation scores them all).
    """
    workers = default_workers() if workers is None else workers
    report = ExtractReport()
    with open_source(source_path) as source:
        if isinstance(source, ManifestSource):
            root, (plan, split_record) = "", plan_manifest(source, params, unsplit)
        else:
            root, split_record = locate_root(source), {}  # the dataset's own split folders
            plan = plan_triplets(source, root, params.classes)
        tasks = [p for p in plan if isinstance(p, TripletTask)]
        details_path = details_path or details_path_for(metrics_path)
        with (
            atomic_path(metrics_path) as metrics_tmp,
            atomic_path(details_path) as details_tmp,
            atomic_dir(out_dir) as tmp,
        ):
            rows, labelled = _collect(source, plan, tasks, workers, report, params, tmp / "subset.zip")
            missing = [s for s in (required_splits or SPLIT_DIRS) if report.class_counts[s]["COVID-19"] == 0]
            if missing:
                first = next((m for m in report.messages if m.startswith("skipped")), "none")
                under = f"in {source.manifest}" if isinstance(source, ManifestSource) else f"under '{root or '.'}'"
                raise ExtractError(
                    f"{source.location}: no usable COVID-19 pairs in split(s) {', '.join(missing)} {under} "
                    f"({report.skipped_total} triplets skipped; first: {first})"
                )
            unlabeled = _unlabeled(source, source_path, labelled, params, tmp, report)
            _write_csv(tmp / "manifest.csv", MANIFEST_FIELDS, rows)
            _write_csv(tmp / "skipped.csv", SKIPPED_FIELDS, report.skipped_rows)
            # The source's base name only (never an absolute path): training records it in the model file.
            write_json(tmp / "source.json", {"name": Path(source_path).resolve().name, **split_record})
            # Written to a temporary file now and renamed onto metrics_path only after the
            # new out_dir is in place, so a failure never pairs new metrics with old outputs.
            unlabeled_count = {} if unlabeled is None else {"unlabeled_images": unlabeled["kept"]}
            write_json(metrics_tmp, report.headline() | unlabeled_count)
            write_json(
                details_tmp, report.to_json() | split_record | ({} if unlabeled is None else {"unlabeled": unlabeled})
            )
    return report


def _unlabeled(source, source_path, labelled: dict[str, str], params: DataParams, out: Path, report) -> dict | None:
    """With ``data.unlabeled``: the archive's unlabeled COVID-19 films beside the subset (covidseg.data.unlabeled);
    returns their report (None when not asked). A manifest source has no such part: ExtractError."""
    if not params.unlabeled:
        return None
    if isinstance(source, ManifestSource):
        raise ExtractError(
            f"{source.location}: data.unlabeled reads the Kaggle archive's Lung Segmentation Data part, and a "
            "manifest has none; set data.unlabeled: false"
        )
    matched = {h: (where.split("/", 1)[0], where) for h, where in labelled.items()}
    rows, found = collect_unlabeled(source_path, matched, out)
    _write_csv(out / "unlabeled.csv", UNLABELED_FIELDS, rows)
    report.messages.extend(found.messages)
    return found.to_json()


def _collect(source, plan, tasks, workers, report, params, subset_path) -> tuple[list[dict], dict[str, str]]:
    """Run the checks in plan order, apply the on_error policy and duplicates, write the subset zip.

    Returns the manifest rows and the films taken: pixel hash -> ``split/class/name``."""
    rows: list[dict] = []
    seen: dict[str, str] = {}

    def skip(split: str, class_dir: str, name: str, reason: str, message: str) -> None:
        if params.on_error == "fail":
            raise ExtractError(f"{message} [{reason}; data.on_error is 'fail']")
        report.skips[split][reason] += 1
        report.messages.append(f"skipped ({reason}): {message}")
        report.skipped_rows.append(
            {"split": split, "class": class_dir, "name": name, "reason": reason, "message": message}
        )

    with (
        _checked(source, tasks, workers) as results,
        zipfile.ZipFile(subset_path, "w", compression=zipfile.ZIP_STORED) as out_zip,
    ):
        for item in plan:
            if not isinstance(item, TripletTask):
                skip(*item)
                continue
            c = next(results)
            t = c.task
            if c.reason is not None:
                skip(t.split, t.class_dir, t.name, c.reason, c.message)
                continue
            where = f"{t.split}/{t.class_dir}/{t.name}"
            if c.pixel_hash in seen:
                skip(
                    t.split,
                    t.class_dir,
                    t.name,
                    "duplicate",
                    f"{source.describe(t.image)}: same pixels as the image already taken at {seen[c.pixel_hash]}",
                )
                continue
            seen[c.pixel_hash] = where
            for f in c.fixes:
                report.fixes[t.split][f.split(":", 1)[0]] += 1
            report.messages.extend(f"fixed: {n}" for n in c.notes)
            report.counts[t.split] += 1
            report.class_counts[t.split][t.class_dir] += 1
            if t.class_dir == "COVID-19":
                report.fractions[t.split].append(c.infected_fraction)
            for kind, data in c.payload.items():
                out_zip.writestr(stored_member(f"{t.split}/{t.class_dir}/{kind}/{t.name}"), data)
            rows.append(
                {
                    "split": t.split,
                    "class": t.class_dir,
                    "id": PurePosixPath(t.name).stem,
                    "image_path": t.image,
                    "infection_path": t.infection,
                    "lung_path": t.lung,
                    "image_sha256": c.sha256[IMAGES],
                    "infection_sha256": c.sha256[INFECTION],
                    "lung_sha256": c.sha256.get(LUNG, ""),
                    "height": c.shape[0],
                    "width": c.shape[1],
                    "infected_fraction": f"{c.infected_fraction:.6f}",
                    "lung_fraction": "" if c.lung_fraction is None else f"{c.lung_fraction:.6f}",
                    "fixes": ";".join(c.fixes),
                    "member": t.name,
                }
            )
    return rows, seen


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
