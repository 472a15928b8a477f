"""The pipeline's first stage: validate params.yaml and data.source before any stage removes outputs.

DVC deletes a stage's outputs before running its command, so a bad value found by the stage
itself would already have cost the previous results. Every other stage depends on the stamp
written here, so a failure here stops ``dvc repro`` while all earlier outputs are still in place.
The stamp's text never changes: rerunning this stage after a valid params edit reruns only the
stages whose own params or deps changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from covidseg.atomic import write_text
from covidseg.data.sources import locate_root, open_source
from covidseg.params import DataParams, validate_all

STAMP_TEXT = "params.yaml and data.source passed the check stage\n"


def produced_by_pipeline(source: str, outs: Iterable[str], repo: str | Path = ".") -> bool:
    """Whether ``source`` is (or lies inside) a pipeline output, e.g. the default ``data/raw/synthetic``."""
    repo = Path(repo).resolve()
    path = Path(source) if Path(source).is_absolute() else repo / source
    try:
        rel = PurePosixPath(path.resolve().relative_to(repo).as_posix())
    except ValueError:
        return False  # outside the repository: not made by a stage
    return any(rel == PurePosixPath(o) or PurePosixPath(o) in rel.parents for o in outs)


def check(params_path: str | Path, stamp: str | Path, outs: Iterable[str], repo: str | Path = ".") -> str:
    """Validate every params section and, unless a stage makes it, the data source; then write the stamp.

    Raises ParamsError (a bad key or value, naming the file) or SourceError (the source is missing,
    not a folder or .zip, or holds no COVID-QU-Ex layout). Returns the source's description.
    """
    data: DataParams = validate_all(params_path)["data"]
    if produced_by_pipeline(data.source, outs, repo):
        found = f"{data.source} (made by the pipeline)"
    else:
        with open_source(data.source) as source:
            root = locate_root(source)
        found = f"{data.source} (dataset root {root or '.'!r})"
    write_text(stamp, STAMP_TEXT)
    return found
