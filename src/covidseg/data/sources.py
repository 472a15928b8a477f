"""Read the raw dataset from a folder or a zip in place, and locate its layout root.

A zip is never unpacked: only the members that extraction asks for are read, so the
33,920 files of ``Lung Segmentation Data`` in the Kaggle archive are never touched.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from covidseg.data.layout import CLASS_DIRS, KIND_DIRS, ROOT_NAME, SPLIT_DIRS, find_roots, ignored_part


class SourceError(ValueError):
    """The raw source is missing, unreadable, or not in the COVID-QU-Ex layout."""


class Source:
    """A tree of files addressed by POSIX paths relative to the source's top."""

    def __init__(self, location: Path, files: list[str]):
        self.location = location
        self.files = files

    def read(self, rel: str) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def describe(self, rel: str) -> str:
        """A human-readable name of one file, for error messages."""
        return f"{self.location}/{rel}" if self.location.is_dir() else f"{self.location}::{rel}"

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderSource(Source):
    """A folder on disk; ``Lung Segmentation Data``, ``__MACOSX`` and hidden folders are not walked."""

    def __init__(self, location: Path):
        files = []
        for dirpath, dirnames, filenames in os.walk(location):
            rel_dir = os.path.relpath(dirpath, location)
            # Never descend into the lung-segmentation half of the archive (nor macOS/hidden debris).
            dirnames[:] = sorted(d for d in dirnames if not ignored_part(d))
            for f in filenames:
                files.append(PurePosixPath(*Path(rel_dir, f).parts).as_posix() if rel_dir != "." else f)
        super().__init__(location, files)

    def read(self, rel: str) -> bytes:
        return (self.location / rel).read_bytes()


class ZipSource(Source):
    """A zip archive read in place: only the central directory is listed, members are read on demand.

    Members under ``Lung Segmentation Data``, ``__MACOSX`` or hidden folders are not even listed,
    so they can never be read.
    """

    def __init__(self, location: Path):
        try:
            self._zip = zipfile.ZipFile(location)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SourceError(f"{location}: not a readable zip archive ({exc})") from None
        files = [
            i.filename
            for i in self._zip.infolist()
            if not i.is_dir() and not any(ignored_part(p) for p in i.filename.split("/")[:-1])
        ]
        self._listed = frozenset(files)
        super().__init__(location, files)

    def read(self, rel: str) -> bytes:
        if rel not in self._listed:
            raise SourceError(f"{self.describe(rel)}: not a dataset member of this archive")
        try:
            return self._zip.read(rel)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise OSError(f"{self.describe(rel)}: cannot read archive member ({exc})") from None

    def close(self) -> None:
        self._zip.close()


def open_source(location: str | Path) -> Source:
    """Open a folder or a ``.zip`` file as a :class:`Source`."""
    location = Path(location)
    if not location.exists():
        raise SourceError(f"{location}: data source not found (set params 'data.source' to the Kaggle folder or .zip)")
    if location.is_dir():
        return FolderSource(location)
    if zipfile.is_zipfile(location):
        return ZipSource(location)
    raise SourceError(f"{location}: data source is neither a folder nor a .zip archive")


def locate_root(source: Source) -> str:
    """The POSIX prefix ('' for the top) under which ``Train/Val/Test`` live.

    Raises SourceError naming the expected layout when there is no root or more than one.
    """
    dirs = set()
    for f in source.files:
        parent = PurePosixPath(f).parent
        while str(parent) not in (".", ""):
            if str(parent) in dirs:
                break
            dirs.add(str(parent))
            parent = parent.parent
    roots = find_roots(dirs)
    expected = (
        f"expected '{ROOT_NAME}/{{{','.join(SPLIT_DIRS.values())}}}/{{{','.join(CLASS_DIRS)}}}/"
        f"{{{','.join(KIND_DIRS)}}}/*.png' at any depth (the Kaggle archive nests it twice: "
        f"'{ROOT_NAME}/{ROOT_NAME}/Train/COVID-19/images/covid_1.png')"
    )
    if not roots:
        raise SourceError(f"{source.location}: no COVID-QU-Ex infection-segmentation layout found; {expected}")
    if len(roots) > 1:
        raise SourceError(f"{source.location}: several dataset roots found {roots}; point data.source at one of them")
    return roots[0]
