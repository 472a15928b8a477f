"""Read the raw dataset from a folder or a zip in place, and locate its layout root.

A zip is never unpacked: only the members that extraction asks for are read, so the
33,920 files of ``Lung Segmentation Data`` in the Kaggle archive are never touched.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from covidseg.data.layout import (
    CLASS_DIRS,
    KIND_DIRS,
    ROOT_NAME,
    SPLIT_DIRS,
    find_roots,
    ignored_part,
    in_infection_part,
    in_lung_part,
)


class SourceError(ValueError):
    """The raw source is missing, unreadable, or not in the COVID-QU-Ex layout."""


class Source:
    """A tree of files addressed by POSIX paths relative to the source's top."""

    resize_masks = False  # whether extraction resizes a mask of another size than its film (a manifest's)

    def __init__(self, location: Path, files: list[str]):
        self.location = location
        self.files = files

    def read(self, rel: str) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def head(self, rel: str, size: int) -> bytes:  # pragma: no cover - overridden
        """The first ``size`` bytes of ``rel`` (see :func:`read_head`)."""
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
    """A folder on disk; ``Lung Segmentation Data``, ``__MACOSX`` and hidden folders are not walked.

    ``files``: the paths (relative to ``location``) to offer instead of walking the folder.
    """

    def __init__(self, location: Path, files: list[str] | None = None):
        if files is None:
            files = []
            for dirpath, dirnames, filenames in os.walk(location):
                rel_dir = os.path.relpath(dirpath, location)
                # Never descend into the lung-segmentation half of the archive (nor macOS/hidden debris).
                dirnames[:] = sorted(d for d in dirnames if not ignored_part(d))
                for f in filenames:
                    files.append(PurePosixPath(*Path(rel_dir, f).parts).as_posix() if rel_dir != "." else f)
        super().__init__(location, files)

    def path(self, rel: str) -> Path:
        """Where file ``rel`` is on disk."""
        return self.location / rel

    def read(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def head(self, rel: str, size: int) -> bytes:
        """The first ``size`` bytes of file ``rel``, opened non-blocking and read only when it is a regular file."""
        where, path = self.describe(rel), self.path(rel)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(f"{where}: symlink loop (its links point back to each other)") from None
            if exc.errno == errno.ENOENT and os.path.islink(path):
                raise OSError(f"{where}: dangling symlink (to {os.readlink(path)!r}, which does not exist)") from None
            raise OSError(f"{where}: cannot open file ({exc.strerror})") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise SourceError(
                    f"{where}: {_file_kind(mode)}, not a regular file; the dataset holds only image files"
                )
            return os.read(fd, size)
        except OSError as exc:
            raise OSError(f"{where}: cannot read file ({exc.strerror})") from None
        finally:
            os.close(fd)


class ZipSource(Source):
    """A zip archive read in place: only the central directory is listed, members are read on demand.

    Members under ``Lung Segmentation Data``, ``__MACOSX`` or hidden folders are not even listed,
    so they can never be read. ``lung_part``: list only the members under ``Lung Segmentation Data``
    instead (self-training's unlabeled films, :mod:`covidseg.data.unlabeled`).
    """

    def __init__(self, location: Path, lung_part: bool = False):
        try:
            self._zip = zipfile.ZipFile(location)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SourceError(f"{location}: not a readable zip archive ({exc})") from None
        files = [
            i.filename
            for i in self._zip.infolist()
            if not i.is_dir() and (in_lung_part if lung_part else in_infection_part)(i.filename.split("/")[:-1])
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

    def head(self, rel: str, size: int) -> bytes:
        """The first ``size`` bytes of member ``rel``, decompressed only that far."""
        if rel not in self._listed:
            raise SourceError(f"{self.describe(rel)}: not a dataset member of this archive")
        try:
            with self._zip.open(rel) as member:
                return member.read(size)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
            raise OSError(f"{self.describe(rel)}: cannot read archive member ({exc})") from None

    def close(self) -> None:
        self._zip.close()


def _file_kind(mode: int) -> str:
    """What a stat mode that is neither a regular file nor a folder is, in words."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def source_kind(location: str | Path) -> str:
    """``"folder"`` or ``"file"`` for ``location`` (symlinks followed), found by ``stat`` alone: nothing is opened.

    Raises SourceError naming the path when it is missing (or a dangling symlink), a symlink loop,
    not stat-able, or not a regular file nor a folder (a FIFO or ``/dev/zero`` would hang a reader or
    grow it without end).
    """
    location = Path(location)
    try:
        mode = os.stat(location).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SourceError(
                f"{location}: data source is a symlink loop (its links point back to each other); "
                "set params 'data.source' to the Kaggle folder or .zip"
            ) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            dangling = (
                f" (a symlink to {os.readlink(location)!r}, which does not exist)" if location.is_symlink() else ""
            )
            raise SourceError(
                f"{location}: data source not found{dangling} (set params 'data.source' to the Kaggle folder or .zip)"
            ) from None
        raise SourceError(f"{location}: cannot access the data source ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    raise SourceError(
        f"{location}: data source is {_file_kind(mode)}, not a regular file or folder "
        "(set params 'data.source' to the Kaggle folder or .zip)"
    )


def open_source(location: str | Path) -> Source:
    """Open a folder, a ``.zip`` file or a manifest (:mod:`covidseg.data.manifest`) as a :class:`Source`.

    The path is checked with ``stat`` first (:func:`source_kind`), so a FIFO, a device or a symlink
    loop is refused before anything is opened or read.
    """
    from covidseg.data.manifest import open_manifest  # the manifest module builds on this one

    location = Path(location)
    kind = source_kind(location)
    manifest = open_manifest(location)
    if manifest is not None:
        return manifest
    if kind == "folder":
        return FolderSource(location)
    try:
        is_zip = zipfile.is_zipfile(location)  # a regular file: reads a bounded tail
    except OSError as exc:
        raise SourceError(f"{location}: cannot read the data source ({exc.strerror or exc})") from None
    if is_zip:
        return ZipSource(location)
    raise SourceError(f"{location}: data source is neither a folder nor a .zip archive")


def read_head(source: Source, rel: str, size: int) -> bytes:
    """The first ``size`` bytes (or fewer) of file ``rel`` of ``source``, for a cheap signature check.

    A folder's file is opened non-blocking and must be a regular file (symlinks followed) before a
    byte is read; a zip member is decompressed only as far as ``size``. Raises SourceError naming the
    file when it is not a regular file (a FIFO, a device: reading it would hang or never end), and
    OSError naming it when it cannot be read (a symlink loop, a dangling link, a damaged member).
    """
    return source.head(rel, size)


def recorded_source_path(location: str | Path, repo: str | Path = ".") -> tuple[str, bool]:
    """``(path, inside)``: ``location`` as ``data.source`` should record it, and whether it lies in ``repo``.

    Inside the checkout: POSIX, relative to ``repo`` (``data/raw/covidqu.zip``), so dvc.lock names the
    same path in every clone. Outside it: absolute (``/data/covidqu``). Nothing is opened or resolved
    through symlinks here except to compare the two paths.
    """
    path, repo = Path(os.path.abspath(location)), Path(os.path.abspath(repo))
    try:
        return PurePosixPath(*path.relative_to(repo).parts).as_posix() or ".", True
    except ValueError:
        return path.as_posix(), False


def layout_index(source: Source, root: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """Map (split dir, class dir, kind dir) -> {file name: source path} for every PNG under ``root``.

    Exactly the files extraction reads (and the check stage inspects); macOS ``._name.png`` debris is skipped.
    """
    prefix = f"{root}/" if root else ""
    index: dict[tuple[str, str, str], dict[str, str]] = collections.defaultdict(dict)
    for f in source.files:
        if not f.startswith(prefix) or not f.lower().endswith(".png"):
            continue
        parts = PurePosixPath(f[len(prefix) :]).parts
        if len(parts) == 4 and not parts[3].startswith("."):
            index[(parts[0], parts[1], parts[2])][parts[3]] = f
    return index


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
