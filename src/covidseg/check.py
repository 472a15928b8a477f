"""The pipeline's first stage: validate params.yaml and data.source before any stage removes outputs.

DVC deletes a stage's outputs before running its command, so a bad value found by the stage
itself would already have cost the previous results. Every other stage depends on the stamp
written here, so a failure here stops ``dvc repro`` while all earlier outputs are still in place.
The stamp's text never changes: rerunning this stage after a valid params edit reruns only the
stages whose own params or deps changed.

The source is checked the way extract would read it, but cheaply: ``stat`` before anything is
opened (a FIFO, a device, a symlink loop), the layout root, the three folders of every requested
class in every split, and the first bytes of every file extract would read (an image signature,
and a PNG's size). What only decoding finds (truncated pixels, empty masks, duplicates) is left
to extract itself.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from covidseg.atomic import write_text
from covidseg.data.decode import PNG_SIGNATURE, is_image_start
from covidseg.data.extract import TripletTask, plan_triplets
from covidseg.data.films import FILM_HEAD_BYTES, is_film_start
from covidseg.data.layout import IMAGES, INFECTION, KIND_DIRS, LUNG, SPLIT_DIRS
from covidseg.data.manifest import ManifestSource
from covidseg.data.sources import Source, SourceError, layout_index, locate_root, open_source, read_head
from covidseg.data.unlabeled import open_lung_part, plan_films
from covidseg.params import DataParams, validate_all

STAMP_TEXT = "params.yaml and data.source passed the check stage\n"

# Enough for every image signature and a PNG's IHDR width and height (bytes 16-24).
HEAD_BYTES = 24


def produced_by_pipeline(source: str, outs: Iterable[str], repo: str | Path = ".") -> bool:
    """Whether ``source`` is (or lies inside) a pipeline output, e.g. the default ``data/raw/synthetic``."""
    repo = Path(repo).resolve()
    path = Path(source) if Path(source).is_absolute() else repo / source
    try:
        rel = PurePosixPath(path.resolve().relative_to(repo).as_posix())
    except ValueError:
        return False  # outside the repository: not made by a stage
    except (RuntimeError, OSError):
        return False  # a symlink loop (Python < 3.13 raises): open_source names it
    return any(rel == PurePosixPath(o) or PurePosixPath(o) in rel.parents for o in outs)


def _image_problem(head: bytes) -> str | None:
    """Why the first bytes of a file cannot start an image, or None when they can."""
    if not head:
        return "empty file, not an image"
    if is_image_start(head):
        return None
    return f"not an image (starts with {head[:8]!r}; expected a PNG or JPEG signature)"


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None for another format."""
    if head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def _folder(source: Source, root: str, *parts: str) -> str:
    return source.describe("/".join(p for p in (root, *parts) if p))


def _triplet_problem(source: Source, task: TripletTask) -> tuple[str, str] | None:
    """(reason, message) from the signatures and PNG sizes of one complete triplet, or None when they pass.

    Raises SourceError for a FIFO or device among its files.
    """
    paths = {IMAGES: task.image, INFECTION: task.infection, LUNG: task.lung}
    sizes = {}
    for kind, rel in paths.items():
        try:
            head = read_head(source, rel, HEAD_BYTES)
        except OSError as exc:  # a SourceError (a FIFO, a device) is not one: it stops the check
            return "unreadable", str(exc)
        problem = _image_problem(head)
        if problem:
            return "unreadable", f"{source.describe(rel)}: {problem}"
        sizes[kind] = _png_size(head)
    image = sizes[IMAGES]
    odd = [
        f"{source.describe(paths[k])} is {s[0]}x{s[1]}"
        for k, s in sizes.items()
        if s is not None and image is not None and s != image
    ]
    if odd:
        return "size_mismatch", f"{source.describe(task.image)}: image is {image[0]}x{image[1]} but " + ", ".join(odd)
    return None


def check_layout(source: Source, root: str, params: DataParams) -> int:
    """Refuse (SourceError, one line naming the path) what extract would refuse; return the triplets seen.

    Every class in ``params.classes`` needs its three folders, each holding ``.png`` files, in every
    split. The triplets are extract's own (:func:`covidseg.data.extract.plan_triplets`, with its
    messages for a missing partner file); each file extract would read is opened only as far as its
    first :data:`HEAD_BYTES`: a FIFO or device stops the check whatever ``on_error`` says (extract
    would hang on it); a file without an image signature, a missing partner file or PNGs of different
    sizes stop it under ``on_error: fail`` and, under ``skip``, when a split is left without a usable
    COVID-19 triplet.
    """
    index = layout_index(source, root)
    for split_dir in SPLIT_DIRS.values():
        for class_dir in params.classes:
            for kind in KIND_DIRS:
                if not index.get((split_dir, class_dir, kind)):
                    hint = (
                        "every split needs COVID-19 images, infection masks and lung masks"
                        if class_dir == "COVID-19"
                        else f"remove {class_dir!r} from params 'data.classes' or add the folder"
                    )
                    raise SourceError(
                        f"{_folder(source, root, split_dir, class_dir, kind)}: folder missing or without .png files "
                        f"(data.classes asks for {class_dir} in every split; {hint})"
                    )
    plan = plan_triplets(source, root, params.classes)
    tally = _Tally(params.on_error)
    for item in plan:
        if isinstance(item, TripletTask):
            tally.add(item.split, item.class_dir, _triplet_problem(source, item))
        else:
            split, class_dir, _, reason, message = item
            tally.add(split, class_dir, (reason, message))
    tally.refuse_empty_splits(f"{source.location}", "triplets", f" under '{root or '.'}'")
    return len(plan)


class _Tally:
    """Usable items per (split, class) and the first COVID-19 problem of each split, under ``data.on_error``."""

    def __init__(self, on_error: str):
        self.on_error, self.bad = on_error, 0
        self.usable: collections.Counter = collections.Counter()
        self.first_bad: dict[str, str] = {}

    def add(self, split: str, class_dir: str, problem: tuple[str, str] | None) -> None:
        """Count one item; a (reason, message) problem raises SourceError under ``fail``."""
        if problem is None:
            self.usable[(split, class_dir)] += 1
            return
        reason, message = problem
        if self.on_error == "fail":
            raise SourceError(f"{message} [{reason}; data.on_error is 'fail']")
        self.bad += 1
        if class_dir == "COVID-19":
            self.first_bad.setdefault(split, message)

    def refuse_empty_splits(self, where: str, items: str, detail: str = "") -> None:
        """SourceError naming ``where`` when a split has no usable COVID-19 item."""
        empty = [s for s in SPLIT_DIRS if self.usable[(s, "COVID-19")] == 0]
        if empty:
            raise SourceError(
                f"{where}: no usable COVID-19 {items} in split(s) {', '.join(empty)}{detail} "
                f"({self.bad} {items} bad; first: {self.first_bad.get(empty[0], 'none')})"
            )


def check_manifest(source: ManifestSource, params: DataParams) -> int:
    """Refuse (SourceError, one line) a manifest the pipeline cannot track or extract would refuse; return its films.

    The pipeline needs the manifest's folder as ``data.source`` and every listed file inside it: DVC hashes
    that folder, so a film edited in place reruns extract (a bare manifest file would be the only thing
    hashed). Then as :func:`check_layout`: each listed file's first bytes must start an image or a DICOM
    file; a missing file or one that is no image stops the check under ``on_error: fail`` and, under
    ``skip``, when a split is left without a usable COVID-19 film. Masks may differ in size from their film.
    """
    if source.bare:
        raise SourceError(
            f"{source.location}: data.source names the manifest file, so DVC would hash only it and a film edited "
            f"in place would not rerun extract; set data.source to its folder {source.folder} (the manifest at its top)"
        )
    outside = source.outside()
    if outside:
        raise SourceError(
            f"{source.manifest}: {len(outside)} listed file(s) lie outside {source.folder}, e.g. {outside[0]!r}: "
            "DVC hashes only that folder, so it would not see them change; move them into it"
        )
    planned, _ = source.plan(params)
    tally = _Tally(params.on_error)
    for p in planned:
        problem = p.problem
        for rel in (r for r in (p.image, p.mask, p.lung) if r and problem is None):
            try:
                head = read_head(source, rel, FILM_HEAD_BYTES)
            except OSError as exc:
                problem = ("unreadable", str(exc))
                break
            if not is_film_start(head):
                what = "empty file" if not head else f"starts with {head[:8]!r}"
                problem = ("unreadable", f"{source.describe(rel)}: not an image nor a DICOM file ({what})")
        tally.add(p.split, p.class_name, problem)
    tally.refuse_empty_splits(f"{source.manifest}", "films")
    return len(planned)


def check(params_path: str | Path, stamp: str | Path, outs: Iterable[str], repo: str | Path = ".") -> str:
    """Validate every params section and, unless a stage makes it, the data source; then write the stamp.

    Raises ParamsError (a bad key or value, naming the file) or SourceError (one line naming the
    path: the source is missing, not a regular file or folder, a symlink loop, not a .zip, holds no
    COVID-QU-Ex layout, or a layout extract would refuse: see :func:`check_layout`). Returns the
    source's description.
    """
    data: DataParams = validate_all(params_path)["data"]
    if produced_by_pipeline(data.source, outs, repo):
        found = f"{data.source} (made by the pipeline)"
    else:
        with open_source(data.source) as source:
            if isinstance(source, ManifestSource):
                if data.unlabeled:
                    raise SourceError(
                        f"{data.source}: data.unlabeled reads the Kaggle archive's Lung Segmentation Data part, and a "
                        "manifest has none; set data.unlabeled: false"
                    )
                seen = check_manifest(source, data)
                found = f"{data.source} ({source.manifest.name}, {seen} films of {', '.join(data.classes)})"
            else:
                root = locate_root(source)
                seen = check_layout(source, root, data)
                found = f"{data.source} (dataset root {root or '.'!r}, {seen} triplets of {', '.join(data.classes)})"
        if data.unlabeled:
            with open_lung_part(data.source) as lung_part:
                found += f"; {len(plan_films(lung_part))} unlabeled COVID-19 films in its lung half"
    write_text(stamp, STAMP_TEXT)
    return found
