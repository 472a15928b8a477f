"""Worker processes do not outlive a parent killed outright (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# A parent that starts extract's spawn pool (its real initializer), keeps both workers busy, prints their pids.
PARENT = """
import multiprocessing, sys, time
from concurrent.futures import ProcessPoolExecutor
from covidseg.data import extract
pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                           initializer=extract._init_worker, initargs=(sys.argv[1],))
futures = [pool.submit(time.sleep, 120) for _ in range(4)]
while len(pool._processes) < 2:
    time.sleep(0.05)
time.sleep(1.0)  # let both initializers run
print(*pool._processes, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def test_extract_pool_workers_exit_when_the_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(p) for p in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if _running(p)]
    for p in left:  # do not leave them behind when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"pool workers {left} outlived their killed parent"


# A parent (standing in for torchrun) that starts one rank-like child which asks to die with it.
TORCHRUN_LIKE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time\\nfrom covidseg.training.distributed import exit_with_parent\\n"
    "assert exit_with_parent()\\nprint('ready', flush=True)\\ntime.sleep(120)"], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(120)
"""


def test_ddp_rank_exits_when_its_launcher_is_killed():
    if not sys.platform.startswith("linux"):
        import pytest

        pytest.skip("parent-death signal is Linux only")
    parent = subprocess.Popen([sys.executable, "-c", TORCHRUN_LIKE], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _running(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(child):
        os.kill(child, signal.SIGKILL)
        raise AssertionError(f"rank process {child} outlived its killed launcher")
