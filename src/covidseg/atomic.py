"""Write outputs so that a failure never leaves a half-written or destroyed file.

Every writer goes through :func:`atomic_path`: it yields a temporary path beside the
target, and only when the block finishes without error is the temporary renamed over
the target (``os.replace`` is atomic on POSIX within one file system).

Temporary names are ``.<target name>.<pid>.<random><suffix>``. A run killed outright
(SIGKILL, power loss) cannot delete its own; the next write to the same target (or
:func:`sweep_stale_temps` over a folder) removes those whose process no longer runs.
Temporaries of a live process are never touched, so concurrent writers stay safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


# ".<name>.<pid>.<8 mkstemp characters><suffix>"; atomic_dir's ".<name>.old" is cleared by atomic_dir itself
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}(?:\..*)?\Z", re.DOTALL)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temporaries left in ``folder`` by killed processes (of target ``name`` only, if given).

    A temporary is stale when the process id in its name no longer runs. Returns the
    paths removed. A missing folder is fine (nothing to do).
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or (name is not None and m["name"] != name) or _pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        try:
            _remove(path)
        except OSError:
            continue  # cannot remove now (read-only folder): the next run tries again
        removed.append(path)
    return removed


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and prove a file can be created and removed there.

    Raises OSError (read-only or full file system, no permission, a parent that is a file).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=_temp_prefix(folder / ".probe"), dir=folder)
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary file path; rename it onto ``target`` on success, delete it on error.

    ``suffix`` defaults to the target's own suffix so that libraries which pick a format
    from the extension (matplotlib, PIL, numpy) still see the right one. ``sweep`` first
    deletes stale temporaries of ``target`` (one folder listing: callers writing many files
    into one folder pass False and call :func:`sweep_stale_temps` once instead). A given
    ``suffix`` must be empty or start with "." (so stale temporaries can be recognised).
    """
    target = Path(target)
    if suffix and not suffix.startswith("."):
        raise ValueError(f"atomic_path suffix must start with '.', got {suffix!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        sweep_stale_temps(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(
        prefix=_temp_prefix(target), suffix=suffix if suffix is not None else target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; swap it in for ``target`` on success, delete it on error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")  # a stale one from a killed run is cleared here
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)  # put the previous output back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class FolderLocked(OSError):
    """Another live process holds the folder's lock (the message names its pid, host and start time)."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str = ".covidseg.lock", what: str = "covidseg") -> Iterator[Path]:
    """Hold ``folder/name`` while the block runs: created exclusively, holding ``pid host start-time``, removed after.

    A lock whose process is gone (same host, pid not running: a killed run) is taken over; a live
    one raises :class:`FolderLocked` naming it, so two writers never interleave in one folder.
    """
    lock = Path(folder) / name
    for attempt in (1, 2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid_text, host, started = (lock.read_text(encoding="utf-8").split(" ", 2) + ["?", "?"])[:3]
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host, started = -1, "?", "?"
            if attempt == 1 and host == socket.gethostname() and pid > 0 and not _pid_alive(pid):
                _remove(lock)  # left by a killed run on this machine
                continue
            raise FolderLocked(
                f"{folder}: another {what} (pid {pid}, host {host}, started {started.strip()}) is writing there; "
                f"wait for it to finish or choose another folder (if no such run exists, delete {lock})"
            ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        yield lock
    finally:
        _remove(lock)


def write_text(target: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``target``."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def details_path_for(metrics_path: str | os.PathLike) -> Path:
    """The file beside a headline metrics file that holds every number: ``metrics/test.json`` -> ``metrics/test_details.json``.

    Only the headline file is declared as DVC metrics (so ``dvc exp show`` stays readable); the
    report reads the details file.
    """
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(f"{metrics_path.stem}_details{metrics_path.suffix}")


def write_json(target: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented JSON (NaN is written as ``null``)."""
    write_text(target, json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")


def _finite(value: Any) -> Any:
    """Replace NaN/inf floats by None so the JSON is standard (DVC and browsers reject NaN)."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
