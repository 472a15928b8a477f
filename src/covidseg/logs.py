"""covidseg's log: the library logs to ``logging.getLogger("covidseg.<module>")``; entry points choose how much shows.

Library modules never configure logging (Python's convention for libraries): the command line
(``covidseg -v`` / ``-q``) and the stage scripts call :func:`configure`. Verbosity: ``QUIET`` shows
warnings and errors only, ``NORMAL`` adds progress and results (what training prints per epoch),
``VERBOSE`` adds debug detail (devices, threads, what was resolved); ``SILENT`` (errors only) is for
the ranks other than 0 of a DDP run, which would repeat rank 0's lines. Stages run by DVC take it
from the environment: ``COVIDSEG_LOG=quiet|normal|verbose dvc repro``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

ROOT_LOGGER = "covidseg"
SILENT, QUIET, NORMAL, VERBOSE = -2, -1, 0, 1
LEVELS = {SILENT: logging.ERROR, QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}
ENV_VAR = "COVIDSEG_LOG"
ENV_VALUES = {"quiet": QUIET, "normal": NORMAL, "verbose": VERBOSE}
_HANDLER_MARK = "_covidseg_handler"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (as ``logging.lastResort`` does), so a
    caller that swaps stderr (a test runner, a notebook) gets the lines and none go to a closed stream."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ sets it; stderr is always read afresh
        pass


class _Formatter(logging.Formatter):
    """Info lines as they are; ``warning: ...`` / ``error: ...`` / ``debug: ...`` otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno == logging.INFO:
            return message
        return f"{record.levelname.lower()}: {message}"


def verbosity_from_flags(verbose: int, quiet: bool) -> int:
    """``-v`` (counted) and ``-q`` as one verbosity; both at once is refused."""
    if verbose and quiet:
        raise ValueError("-v/--verbose and -q/--quiet contradict each other: give one")
    return QUIET if quiet else min(verbose, VERBOSE)


def verbosity_from_env(environ: dict[str, str] | None = None) -> int:
    """``COVIDSEG_LOG`` (quiet, normal, verbose; unset or empty: normal); another value is refused by name."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if not value:
        return NORMAL
    if value not in ENV_VALUES:
        raise ValueError(f"{ENV_VAR}={value!r}: must be one of {', '.join(ENV_VALUES)}")
    return ENV_VALUES[value]


def stage_verbosity(environ: dict[str, str] | None = None) -> int:
    """A stage script's verbosity: :func:`verbosity_from_env` on rank 0 (``RANK`` unset counts as 0), ``SILENT`` elsewhere."""
    environ = os.environ if environ is None else environ
    level = verbosity_from_env(environ)
    return level if int(environ.get("RANK", "0") or 0) == 0 else SILENT


def configure(verbosity: int = NORMAL, stream: TextIO | None = None) -> logging.Logger:
    """Send the ``covidseg`` loggers to ``stream`` (default: the current stderr) at ``verbosity``; calling it again
    replaces the handler.

    Returns the root ``covidseg`` logger. Only entry points call this.
    """
    if verbosity not in LEVELS:
        raise ValueError(f"verbosity must be one of {sorted(LEVELS)}, got {verbosity!r}")
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(_Formatter())
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(LEVELS[verbosity])
    return logger
