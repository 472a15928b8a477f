"""Segment infection on X-rays of any size and mode with a trained model (``covidseg predict``).

For every input image the outputs in ``out_dir`` are

    masks/<stem>.png      uint8 mode L (H, W), 0 = clear, 255 = predicted infected
    lungs/<stem>.png      uint8 mode L (H, W), 0 = not lung, 255 = predicted lung (models with a lung head)
    overlays/<stem>.png   uint8 RGB (H, W, 3), the grey X-ray with the predicted region tinted and the
                          predicted lungs outlined, the sides marked R/L and a legend (128 px and up)
    probs/<stem>.npy      float32 (H, W) probabilities in [0, 1] (only with ``save_probs``)
    seg/<stem>.dcm        a DICOM Segmentation over the source film (DICOM inputs, only with ``dicom_seg``)
    predictions.csv       one row per input (see :data:`CSV_COLUMNS`)

where (H, W) is the input's own size. Preprocessing matches training exactly: the file is
decoded to 8-bit grey by :func:`covidseg.data.decode.decode_grey` (DICOM files, recognised by
their ``DICM`` marker, by :func:`covidseg.data.dicom.decode_dicom`), resized to the model's
``size`` x ``size`` by :func:`covidseg.data.preprocess.resize_image` (PIL bilinear), divided by 255
and run by the model's backend (:mod:`covidseg.inference.backends`: torch for ``model.pt``,
onnxruntime without torch for ``model.onnx``), and the calibrated probabilities are resized back
to (H, W) bilinearly before thresholding (``probability >= threshold`` is infected, as in evaluation).

After a run, each row of ``predictions.csv`` describes exactly the files of its stem: an
``ok`` row has its mask and overlay (and probs with ``save_probs``), an ``error`` row has
none (partial or older files of that stem are removed). When the output folder itself
fails (read-only, full, gone) the run stops with :class:`OutputError`; the CSV is still
written when possible, with the inputs not reached marked ``not_run``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from covidseg.atomic import FolderLocked, atomic_path, check_writable, folder_lock, sweep_stale_temps
from covidseg.data.arrays import resize_image
from covidseg.data.decode import BadImageError, decode_grey, low_range_warning
from covidseg.data.dicom import DICM_OFFSET, DicomError, decode_dicom, is_dicom
from covidseg.data.manifest import unique_names
from covidseg.inference import backends
from covidseg.inference.backends import LoadedModel, model_warnings, provenance_lines
from covidseg.inference.dicom_seg import DicomSegError, SegAlgorithm, write_dicom_seg
from covidseg.inference.overlay import annotate, draw_outline, tint
from covidseg.inference.pipeline import pipelined
from covidseg.masks.plausibility import severity_refusals, view_of
from covidseg.masks.severity import LUNG_THRESHOLD, split_lungs, split_severity
from covidseg.masks.share_interval import SIDES, ShareInterval, film_intervals

__all__ = [
    "LoadedModel",
    "model_warnings",
    "provenance_lines",
    "load_model_for_predict",
    "predict_files",
    "collect_inputs",
]

# Files a folder or a glob pattern contributes (case-insensitive); files named explicitly are always tried.
# Files with no suffix are taken from a folder or pattern when their header says DICOM.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm", ".pnm", ".dcm", ".dicom"}
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})  # always decoded as DICOM (a file without the marker is refused)
CSV_COLUMNS = (
    "input",
    "stem",
    "width",
    "height",
    "sop_instance_uid",
    "infected_fraction",
    "mean_probability",
    "view",
    "severity_status",
    "right_lung_infected_pct",
    "right_lung_infected_pct_low",
    "right_lung_infected_pct_high",
    "left_lung_infected_pct",
    "left_lung_infected_pct_low",
    "left_lung_infected_pct_high",
    "lungs_infected_pct",
    "right_extent",
    "left_extent",
    "extent_score",
    "infected_outside_lungs_pct",
    "right_lung_area_cm2",
    "left_lung_area_cm2",
    "right_infected_area_cm2",
    "left_infected_area_cm2",
    "pixel_spacing_source",
    "review",
    "status",
    "error",
    "warning",
)
OUTPUT_FOLDERS = ("masks", "lungs", "overlays", "probs", "seg")
ID_CHOICES = ("path", "sop-uid")
# A DICOM UID (PS3.5 9.1): what --id sop-uid accepts as a file name; anything else (a path, "..") is refused.
UID_PATTERN = re.compile(r"(?=.{1,64}$)[0-9]+(\.[0-9]+)*")
LOCK_NAME = ".covidseg-predict.lock"  # held while a run writes the folder (covidseg.atomic.folder_lock)
SEVERITY_COLUMNS = {  # CSV column: key of covidseg.masks.severity.lung_shares / extent scores
    "right_lung_infected_pct": "right_pct",
    "left_lung_infected_pct": "left_pct",
    "lungs_infected_pct": "lungs_pct",
    "right_extent": "right_extent",
    "left_extent": "left_extent",
    "extent_score": "extent_score",
    "infected_outside_lungs_pct": "infected_outside_lungs_pct",
}
AREA_COLUMNS = {  # CSV column: pixel count of covidseg.masks.severity.split_severity(counts=True)
    "right_lung_area_cm2": "right_lung_px",
    "left_lung_area_cm2": "left_lung_px",
    "right_infected_area_cm2": "right_infected_px",
    "left_infected_area_cm2": "left_infected_px",
}
INTERVAL_COLUMNS = tuple(f"{side}_lung_infected_pct_{end}" for side in SIDES for end in ("low", "high"))
# Write errors that concern the whole output folder, not one image: the run stops on them.
_FOLDER_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENOENT}
)
MOSTLY_INFECTED = 0.9  # an image with more of its pixels marked infected than this gets a warning


class InputError(ValueError):
    """An INPUT argument that names no file and matches nothing (reported before any work is done)."""


class OutputError(OSError):
    """The output folder or ``predictions.csv`` cannot be written (read-only, full, not a folder)."""


@dataclass(frozen=True)
class PredictOptions:
    """How to run: ``threshold`` None means the model's val-tuned threshold (0.5 if it has none);
    ``flip_tta`` None means as the model was calibrated (its saved ``flip_tta``, off if it has none).
    ``device`` and ``precision`` apply to a torch model only (onnxruntime runs on the CPU in fp32)."""

    threshold: float | None = None
    save_probs: bool = False
    batch_size: int = 8
    device: str = "auto"
    precision: str = "fp32"
    flip_tta: bool | None = None
    recursive: bool = False
    dicom_seg: bool = False  # also write seg/<stem>.dcm, a DICOM Segmentation, for each DICOM input
    id_by: str = "path"  # "path": rows and outputs named by the input's path; "sop-uid": by its SOP Instance UID


@dataclass
class Row:
    """One line of ``predictions.csv``; sizes in pixels, fractions in [0, 1]."""

    input: str
    stem: str
    width: int | None = None
    height: int | None = None
    sop_instance_uid: str = ""  # DICOM inputs that have one; empty otherwise
    infected_fraction: float | None = None
    mean_probability: float | None = None
    view: str = ""  # PA, AP, lateral or unknown (DICOM ViewPosition; unknown for other files)
    severity_status: str = ""  # "ok", or why the film gives no severity (codes of covidseg.masks.plausibility)
    right_lung_infected_pct: float | None = None  # percent of that lung's pixels (image left = patient's right)
    right_lung_infected_pct_low: float | None = None  # its 95 % interval (covidseg.masks.share_interval)
    right_lung_infected_pct_high: float | None = None
    left_lung_infected_pct: float | None = None
    left_lung_infected_pct_low: float | None = None
    left_lung_infected_pct_high: float | None = None
    lungs_infected_pct: float | None = None
    right_extent: int | None = None  # 0-4 per lung, summed to extent_score 0-8
    left_extent: int | None = None
    extent_score: int | None = None
    infected_outside_lungs_pct: float | None = None  # percent of the infected pixels
    right_lung_area_cm2: float | None = None  # cm^2 at the patient, DICOM files with a pixel spacing only
    left_lung_area_cm2: float | None = None
    right_infected_area_cm2: float | None = None
    left_infected_area_cm2: float | None = None
    pixel_spacing_source: str = ""  # which DICOM attribute gave the spacing (covidseg.data.dicom.pixel_area)
    review: str = ""  # why a reader should check this film's severity, codes joined by "+" (empty: none)
    status: str = "ok"  # "ok", "error" or "not_run" (the run stopped before this input)
    error: str = ""
    warning: str = ""  # e.g. almost no contrast after decoding; the row is still "ok"

    def as_csv(self) -> list[str]:
        def fmt(v):
            return "" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))

        return [fmt(getattr(self, c)) for c in CSV_COLUMNS]


# ----------------------------------------------------------------------------- inputs


def _is_image_name(path: Path) -> bool:
    """An image suffix, or no suffix and a DICOM header (the ``DICM`` marker after the 128-byte preamble)."""
    if path.suffix:
        return path.suffix.lower() in IMAGE_SUFFIXES
    try:
        with open(path, "rb") as f:
            return is_dicom(f.read(DICM_OFFSET + 4))
    except OSError:
        return False


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and not p.name.startswith(".") and _is_image_name(p))


def collect_inputs(inputs: Sequence[str], recursive: bool = False) -> list[Path]:
    """Expand INPUT arguments (files, folders, glob patterns) into a list of files, in order.

    A file is taken whatever its name; a folder gives its image files (by suffix, DICOM also
    without a suffix, sorted;
    with ``recursive`` also those in subfolders); a pattern (``*``, ``?``, ``[...]``, ``**``)
    gives the image files it matches and the images of folders it matches. A file reached
    twice is kept once. Raises InputError listing every INPUT that yields nothing.
    """
    paths: list[Path] = []
    seen: set[Path] = set()
    problems: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = _folder_images(path, recursive)
            if not found:
                problems.append(f"{raw}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif glob.has_magic(raw):
            found = []
            for match in sorted(glob.glob(raw, recursive=True)):
                m = Path(match)
                if m.is_dir():
                    found.extend(_folder_images(m, recursive))
                elif m.is_file() and _is_image_name(m):
                    found.append(m)
            if not found:
                problems.append(f"{raw}: pattern matches no image files")
        else:
            problems.append(f"{raw}: no such file or folder")
            found = []
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    if problems:
        raise InputError("; ".join(problems))
    return paths


def unique_stems(paths: Iterable[Path]) -> list[str]:
    """Output names: each file's stem, with ``-1``, ``-2``, ... added when an earlier file took it.

    Compared case-insensitively, so outputs never collide on case-insensitive file systems.
    """
    return unique_names(p.stem or "image" for p in paths)


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class InputInfo:
    """What an input file says beyond its pixels (DICOM files only; empty for other images)."""

    sop_instance_uid: str = ""
    pixel_area_mm2: float | None = None  # one pixel's area at the patient (covidseg.data.dicom.pixel_area)
    spacing_source: str = ""
    header: Any = None  # the pruned header a DICOM SEG needs (covidseg.data.dicom.reference_header)
    view: str = "unknown"  # covidseg.masks.plausibility.view_of
    body_part: str = ""  # BodyPartExamined


def load_input(path: Path) -> tuple[np.ndarray, InputInfo]:
    """(uint8 (H, W) grey levels, :class:`InputInfo`) of an image or DICOM file.

    A file with the DICOM marker (whatever its name) or a ``.dcm``/``.dicom`` suffix is read by
    :func:`covidseg.data.dicom.decode_dicom`; any other by :func:`covidseg.data.decode.decode_grey`,
    as the pipeline converts its data. Raises BadImageError naming ``path`` when it cannot be
    read or decoded (also for the DICOMs refused: multi-frame, colour, no image, compressed).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    info = InputInfo()
    try:
        if is_dicom(data) or path.suffix.lower() in DICOM_SUFFIXES:
            grey, meta = decode_dicom(data, str(path))
            info = InputInfo(
                meta.get("SOPInstanceUID", ""),
                meta["pixel_area_mm2"],
                meta["spacing_source"],
                meta["header"],
                view_of(meta["ViewPosition"]),
                meta["BodyPartExamined"],
            )
        else:
            grey, _ = decode_grey(data, str(path))
    except DicomError as exc:
        raise BadImageError(str(exc)) from None
    except BadImageError:
        raise
    except Exception as exc:  # e.g. PIL's DecompressionBombError, odd modes numpy cannot map
        raise BadImageError(f"{path}: cannot decode image ({exc})") from None
    if grey.ndim != 2 or grey.size == 0:
        raise BadImageError(f"{path}: decoded to shape {grey.shape}, expected one 2-D image")
    return grey, info


def resize_probs(prob: np.ndarray, width: int, height: int) -> np.ndarray:
    """float32 (S, S) probabilities -> float32 (height, width), PIL bilinear, clipped to [0, 1]."""
    if prob.shape == (height, width):
        return prob.astype(np.float32, copy=False)
    out = np.asarray(Image.fromarray(prob.astype(np.float32, copy=False)).resize((width, height), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _save_png(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    with atomic_path(path, sweep=False) as tmp:
        tmp.write_bytes(buf.getvalue())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, sweep=False) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def output_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """The per-image output files of ``stem``, keyed by folder (see the module doc)."""
    return {
        "masks": out_dir / "masks" / f"{stem}.png",
        "lungs": out_dir / "lungs" / f"{stem}.png",
        "overlays": out_dir / "overlays" / f"{stem}.png",
        "probs": out_dir / "probs" / f"{stem}.npy",
        "seg": out_dir / "seg" / f"{stem}.dcm",
    }


def remove_outputs(out_dir: Path, stem: str, keep: Iterable[str] = ()) -> None:
    """Delete the output files of ``stem`` except the folders in ``keep`` (best effort: a
    file that cannot be deleted on a read-only folder stays)."""
    for folder, path in output_paths(out_dir, stem).items():
        if folder not in keep:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def write_outputs(
    out_dir: Path,
    stem: str,
    grey: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    save_probs: bool,
    lung_prob: np.ndarray | None = None,
    pixel_area_mm2: float | None = None,
    dicom_seg: tuple[Any, SegAlgorithm] | None = None,
    view: str = "unknown",
    body_part: str = "",
    share_interval: ShareInterval | None = None,
) -> dict[str, float]:
    """Write mask, lungs, overlay (and probs) for one image; grey uint8 (H, W), prob and lung_prob float32 (H, W).

    Returns the infected fraction and mean probability over the image's H * W pixels and, with
    ``lung_prob``, the severity measures of :func:`severity_of` (the CSV's severity columns), each
    lung's 95 % share interval from ``share_interval`` (the model's, fitted on val; empty without one)
    and the ``review`` reasons (:func:`covidseg.masks.share_interval.film_intervals`). All
    or nothing: on an error every file of ``stem`` (also older ones) is removed before it is raised;
    files this run does not make (probs without ``save_probs``, lungs without a lung head) are removed.
    With ``dicom_seg`` (the film's pruned header, the algorithm), also ``seg/<stem>.dcm``
    (:func:`covidseg.inference.dicom_seg.write_dicom_seg`; DicomSegError when it cannot be built).
    """
    paths = output_paths(out_dir, stem)
    mask = prob >= threshold
    lungs = None if lung_prob is None else lung_prob >= LUNG_THRESHOLD
    made = ["masks", "overlays"] + (["lungs"] if lungs is not None else []) + (["probs"] if save_probs else [])
    made += ["seg"] if dicom_seg is not None else []
    overlay = tint(grey, mask)
    try:
        _save_png(paths["masks"], np.where(mask, 255, 0).astype(np.uint8))
        if lungs is not None:
            _save_png(paths["lungs"], np.where(lungs, 255, 0).astype(np.uint8))
            overlay = draw_outline(overlay, lungs)
        _save_png(paths["overlays"], annotate(overlay, threshold, lungs is not None))
        if save_probs:
            _save_npy(paths["probs"], prob)
        if dicom_seg is not None:
            header, algorithm = dicom_seg
            write_dicom_seg(paths["seg"], header, mask, lungs, algorithm, name=stem)
    except BaseException:
        remove_outputs(out_dir, stem)
        raise
    remove_outputs(out_dir, stem, keep=made)
    measures = {"infected_fraction": float(mask.mean()), "mean_probability": float(prob.mean(dtype=np.float64))}
    if lungs is None:
        return measures
    split = split_lungs(lungs)  # once, for the severity and its interval (a full-size film's labelling costs)
    severity = severity_of(mask, lungs, pixel_area_mm2, grey=grey, view=view, body_part=body_part, split=split)
    status = severity["severity_status"]
    bounds = film_intervals(prob, lung_prob, threshold, share_interval, status=status, lungs=split)
    for side in SIDES:
        for end in ("low", "high"):
            value = bounds[f"{side}_pct_{end}"]
            shown = severity[f"{side}_lung_infected_pct"] is not None and value == value
            severity[f"{side}_lung_infected_pct_{end}"] = value if shown else None
    return measures | severity | {"review": bounds["review"]}


def severity_of(
    infection: np.ndarray,
    lungs: np.ndarray,
    pixel_area_mm2: float | None = None,
    grey: np.ndarray | None = None,
    view: str = "unknown",
    body_part: str = "",
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The CSV's severity columns from bool (H, W) infection and lung masks: per-lung and both-lung
    infected share (percent), extent scores (0-4 per lung, 0-8 summed), the share of the infected
    pixels outside the lungs (percent), ``severity_status`` and, under ``severity_warning``, the
    reasons in words. With ``pixel_area_mm2`` (a DICOM file's spacing), each lung's area and its
    infected area in cm^2.

    Where the film cannot give a severity (:func:`covidseg.masks.plausibility.severity_refusals`,
    from ``grey``, ``view`` and ``body_part`` as well as the masks) the cells are empty, never a
    number: all of them, except that with one lung found its own share, extent and areas stay and
    only the other lung's and the both-lung totals are empty. ``infected_outside_lungs_pct`` is
    always given. ``severity_status`` is ``ok`` or the reason codes joined by ``+``. ``split``: the
    (right, left) lungs of :func:`covidseg.masks.severity.split_lungs` when the caller has them.
    """
    right, left = split_lungs(lungs) if split is None else split
    values = split_severity(infection, right, left, counts=True)
    out: dict[str, Any] = {
        column: (None if values[key] != values[key] else values[key]) for column, key in SEVERITY_COLUMNS.items()
    }
    for column, key in AREA_COLUMNS.items():
        lung_found = values[key.replace("infected", "lung")] > 0
        out[column] = values[key] * pixel_area_mm2 / 100.0 if pixel_area_mm2 and lung_found else None
    reasons = severity_refusals(grey, infection, right, left, view=view, body_part=body_part)
    codes = [code for code, _ in reasons]
    if codes == ["one_lung"]:
        missing = "left" if right.any() else "right"
        empty = [
            "lungs_infected_pct",
            "extent_score",
            *(c for c in (*SEVERITY_COLUMNS, *AREA_COLUMNS) if c.startswith(missing)),
        ]
    elif codes:
        empty = [c for c in (*SEVERITY_COLUMNS, *AREA_COLUMNS) if c != "infected_outside_lungs_pct"]
    else:
        empty = []
    for column in empty:
        out[column] = None
    out["severity_status"] = "+".join(codes) or "ok"
    out["severity_warning"] = "; ".join(message for _, message in reasons)
    return out


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir``, check that files can be written there, delete temporaries of killed runs.

    Raises OutputError naming the folder and the reason (read-only, not a folder, no space).
    """
    out_dir = Path(out_dir)
    try:
        check_writable(out_dir)
    except OSError as exc:
        raise OutputError(f"output folder {out_dir}: cannot write there ({_reason(exc)})") from None
    for folder in (out_dir, *(out_dir / name for name in OUTPUT_FOLDERS)):
        sweep_stale_temps(folder)
    return out_dir


def _reason(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror}{where}" if exc.strerror else str(exc)


# ----------------------------------------------------------------------------- model


def load_model_for_predict(model_path: str | Path, options: PredictOptions) -> LoadedModel:
    """Load a ``model.pt`` (torch) or ``model.onnx`` (onnxruntime, no torch) with ``options`` applied.

    See :func:`covidseg.inference.backends.load_any_model`; raises FileNotFoundError / ValueError
    naming the model file, RuntimeError for an unusable device.
    """
    return backends.load_any_model(
        model_path,
        threshold=options.threshold,
        flip_tta=options.flip_tta,
        device=options.device,
        precision=options.precision,
        batch_size=max(1, options.batch_size),
    )


def mostly_infected_warning(rows: Iterable[Row]) -> str | None:
    """A warning when some images have more than MOSTLY_INFECTED of their pixels marked infected, else None."""
    flagged = [r.stem for r in rows if r.infected_fraction is not None and r.infected_fraction > MOSTLY_INFECTED]
    if not flagged:
        return None
    shown = ", ".join(flagged[:5]) + (f" and {len(flagged) - 5} more" if len(flagged) > 5 else "")
    return (
        f"WARNING: {len(flagged)} image(s) have more than {MOSTLY_INFECTED:.0%} of their pixels marked infected "
        f"({shown}); the model or the threshold does not suit these images"
    )


# ----------------------------------------------------------------------------- run


def predict_files(
    paths: Sequence[Path],
    out_dir: str | Path,
    prepared: LoadedModel,
    options: PredictOptions,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Predict every file in ``paths``; write per-image outputs and ``predictions.csv`` under ``out_dir``.

    Images are decoded ``options.batch_size`` at a time and run through the model as one batch,
    while the next batch is decoded and the last one's files written (so memory holds at most three
    batches of full-size images). A file that fails gets a
    row with status ``error`` and its message; the others still run. ``on_row`` is called
    with each finished row (for progress and error reporting). Returns the rows in input order.

    Raises OutputError when the output folder cannot be written (checked first) or fails
    during the run (full, read-only, removed): then the rows not reached are ``not_run`` and
    ``predictions.csv`` is still written if it can be. Also raised when the CSV cannot be written, and
    when another live run holds the folder's lock (``.covidseg-predict.lock``, naming its pid): two runs
    never write one folder at once. ``predictions.csv`` describes every image whose outputs the folder
    holds: an earlier run's rows are kept for the images this run does not replace (:func:`earlier_rows`).
    """
    out_dir = prepare_out_dir(out_dir)
    try:
        with folder_lock(out_dir, LOCK_NAME, "covidseg predict"):
            return _predict_locked(paths, out_dir, prepared, options, on_row)
    except FolderLocked as exc:
        raise OutputError(str(exc)) from None


def _predict_locked(
    paths: Sequence[Path],
    out_dir: Path,
    prepared: LoadedModel,
    options: PredictOptions,
    on_row: Callable[[Row], None] | None,
) -> list[Row]:
    """:func:`predict_files`' work, with ``out_dir`` locked for this run.

    Decoding the next batch and writing the last one's files run in threads beside the model
    (:func:`covidseg.inference.pipeline.pipelined`); rows are finished here, in input order.
    """
    earlier = earlier_rows(out_dir)
    if options.id_by == "sop-uid":
        ids = [uid if UID_PATTERN.fullmatch(uid) else "" for uid in sop_uid_ids(paths)]
        stems = unique_names(i or f"input-{k + 1}" for k, i in enumerate(ids))
        rows = [Row(input=i or s, stem=s) for i, s in zip(ids, stems)]
        names = [r.input for r in rows]  # what messages call each input: never its path
    else:
        stems = unique_stems(paths)
        rows = [Row(input=str(p), stem=s) for p, s in zip(paths, stems)]
        names = [str(p) for p in paths]
    step = max(1, options.batch_size)
    batches = [range(start, min(start + step, len(paths))) for start in range(0, len(paths), step)]
    algorithm = SegAlgorithm(
        prepared.file_name,
        str(prepared.provenance.get("code_hash", "")),
        f"{prepared.file_sha256}|threshold {prepared.threshold!r}|flip {options.flip_tta!r}|{prepared.description}",
    )

    def write(batch: _Batch) -> _Batch:
        return _write_batch(
            batch,
            out_dir,
            stems,
            prepared.threshold,
            options.save_probs,
            algorithm if options.dicom_seg else None,
            prepared.share_interval,
        )

    def decode(indices: range) -> _Batch:
        batch = _decode_batch(paths, indices, names)
        if options.id_by == "sop-uid":  # no path in any message: file names often hold patient names
            for i in indices:
                if i in batch.failures:
                    batch.failures[i] = batch.failures[i].replace(str(paths[i]), names[i])
                elif not ids[i]:
                    batch.failures[i] = (
                        f"{names[i]}: no valid SOP Instance UID (digits and dots, at most 64 characters; "
                        "--id sop-uid names outputs by it)"
                    )
                    del batch.decoded[i], batch.greys[i]
        return batch

    steps = pipelined(batches, decode, lambda b: _run_batch(b, prepared), write)
    with contextlib.closing(steps):
        for batch in steps:
            for i, message in batch.failures.items():
                _fail(rows[i], message, on_row)
            for i, (info, warning, shape) in batch.decoded.items():
                rows[i].sop_instance_uid, rows[i].warning = info.sop_instance_uid, warning
                rows[i].pixel_spacing_source, rows[i].view = info.spacing_source, info.view
                rows[i].height, rows[i].width = shape
                result = batch.written.get(i)
                if isinstance(result, DicomSegError):
                    _fail(rows[i], str(result).replace(stems[i], names[i], 1), on_row)
                elif isinstance(result, OSError):
                    message = f"{names[i]}: cannot write outputs ({_reason(result)})"
                    if result.errno in _FOLDER_ERRNOS:
                        _fail(rows[i], message, None)
                        _stop(out_dir, rows, f"output folder {out_dir}: writing stopped ({_reason(result)})")
                    _fail(rows[i], message, on_row)
                elif result is not None:
                    said = result.pop("severity_warning", "")
                    for name, value in result.items():
                        setattr(rows[i], name, value)
                    if said:
                        rows[i].warning = "; ".join(w for w in (rows[i].warning, f"no severity: {said}") if w)
                    if on_row:
                        on_row(rows[i])
    ours = {r.stem for r in rows}
    _write_csv_or_stop(out_dir / "predictions.csv", [r for r in earlier if r.stem not in ours] + rows)
    return rows


@dataclass
class _Batch:
    """One batch on its way through :func:`_predict_locked`'s pipeline, by input index."""

    decoded: dict[int, tuple[InputInfo, str, tuple[int, int]]]  # what the file says, a warning, (H, W)
    failures: dict[int, str]  # the inputs that could not be decoded: their messages
    greys: dict[int, np.ndarray]  # uint8 (H, W) each, until written
    probs: np.ndarray | None = None  # float32 (n, S, S), in the order of ``greys``
    lung_probs: np.ndarray | None = None  # float32 (n, S, S), or None without a lung head
    written: dict[int, dict[str, float] | OSError] = field(default_factory=dict)  # measures, or the write error


def _decode_batch(paths: Sequence[Path], indices: range, names: Sequence[str]) -> _Batch:
    """Decode ``paths[i]`` for i in ``indices``; warnings call each input ``names[i]``."""
    batch = _Batch(decoded={}, failures={}, greys={})
    for i in indices:
        try:
            grey, info = load_input(paths[i])
        except BadImageError as exc:
            batch.failures[i] = str(exc)
            continue
        batch.greys[i] = grey
        batch.decoded[i] = (info, low_range_warning(grey, names[i]) or "", grey.shape)
    return batch


def _run_batch(batch: _Batch, prepared: LoadedModel) -> _Batch:
    if batch.greys:
        small = np.stack([resize_image(g, prepared.size) for g in batch.greys.values()])[:, None]  # uint8 (n, 1, S, S)
        batch.probs, batch.lung_probs = prepared.run(small)
    return batch


def _write_batch(
    batch: _Batch,
    out_dir: Path,
    stems: list[str],
    threshold: float,
    save_probs: bool,
    seg_algorithm: SegAlgorithm | None = None,
    share_interval: ShareInterval | None = None,
) -> _Batch:
    """Write the batch's files; stop at the first error that means the folder itself failed (full, read-only, gone)."""
    for i in batch.failures:
        remove_outputs(out_dir, stems[i])
    for k, (i, grey) in enumerate(list(batch.greys.items())):
        del batch.greys[i]
        try:
            prob = resize_probs(batch.probs[k], grey.shape[1], grey.shape[0])
            lung = None if batch.lung_probs is None else resize_probs(batch.lung_probs[k], grey.shape[1], grey.shape[0])
            info = batch.decoded[i][0]
            seg = (info.header, seg_algorithm) if seg_algorithm is not None and info.header is not None else None
            batch.written[i] = write_outputs(
                out_dir,
                stems[i],
                grey,
                prob,
                threshold,
                save_probs,
                lung_prob=lung,
                pixel_area_mm2=info.pixel_area_mm2,
                dicom_seg=seg,
                view=info.view,
                body_part=info.body_part,
                share_interval=share_interval,
            )
        except DicomSegError as exc:
            batch.written[i] = exc
        except OSError as exc:
            batch.written[i] = exc
            if exc.errno in _FOLDER_ERRNOS:
                break
    batch.greys.clear()
    return batch


def sop_uid_ids(paths: Sequence[Path]) -> list[str]:
    """Each input's SOP Instance UID, read from its header without the pixels; "" for a file without one
    (not DICOM, or no UID, or unreadable: decoding reports the latter)."""
    from pydicom import dcmread

    ids = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(DICM_OFFSET + 4)
                if not is_dicom(head):
                    ids.append("")
                    continue
                f.seek(0)
                ds = dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            ids.append(str(ds.get("SOPInstanceUID", "") or ""))
        except Exception:  # unreadable: the decode step names the problem
            ids.append("")
    return ids


def earlier_rows(out_dir: Path) -> list[Row]:
    """The rows of an earlier run's ``predictions.csv`` in ``out_dir`` whose mask is still on disk, so the table
    this run writes describes every image whose outputs the folder holds (this run's rows replace same stems).
    An unreadable or foreign table is left out (this run's rows are then the whole table)."""
    path = out_dir / "predictions.csv"
    try:
        old = read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    if not old or set(old[0]) != set(CSV_COLUMNS):
        return []
    kept = []
    for values in old:
        if values["status"] == "ok" and output_paths(out_dir, values["stem"])["masks"].is_file():
            kept.append(Row(**{c: (values[c] if values[c] != "" else None) for c in CSV_COLUMNS}))
    return kept


def _stop(out_dir: Path, rows: list[Row], message: str) -> None:
    """Mark the rows not reached as not_run, write the CSV if possible, raise OutputError(message)."""
    for row in rows:
        if row.status == "ok" and row.infected_fraction is None:
            row.status, row.error = "not_run", "not run: the output folder failed first"
    csv_path = out_dir / "predictions.csv"
    try:
        write_csv(csv_path, rows)
    except OSError as exc:
        raise OutputError(f"{message}; {csv_path} could not be written either ({_reason(exc)})") from None
    done = sum(r.status == "ok" for r in rows)
    raise OutputError(f"{message}; {csv_path} lists the {done} of {len(rows)} inputs whose outputs were written")


def _write_csv_or_stop(path: Path, rows: list[Row]) -> None:
    try:
        write_csv(path, rows)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot write the results table ({_reason(exc)}); the per-image files were written"
        ) from None


def _fail(row: Row, message: str, on_row: Callable[[Row], None] | None) -> None:
    row.status, row.error = "error", message
    for name in ("infected_fraction", "mean_probability", *SEVERITY_COLUMNS, *AREA_COLUMNS, *INTERVAL_COLUMNS):
        setattr(row, name, None)
    row.review = ""
    if on_row:
        on_row(row)


def write_csv(path: str | Path, rows: Iterable[Row]) -> None:
    """Atomically write rows as CSV with header :data:`CSV_COLUMNS` (empty cells where unknown)."""
    with atomic_path(path, sweep=False) as tmp:  # prepare_out_dir swept the folder
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(r.as_csv() for r in rows)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``predictions.csv`` as dicts of strings (for tests and scripts)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
