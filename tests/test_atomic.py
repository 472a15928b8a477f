import pytest

from covidseg.atomic import _UMASK, atomic_dir, atomic_path, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "y").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_outputs_get_the_usual_permissions_and_nan_becomes_null(tmp_path):
    write_json(tmp_path / "m.json", {"x": float("nan"), "y": [float("inf"), 1.5]})
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~_UMASK  # not mkstemp's 0600
    assert (tmp_path / "m.json").read_text() == '{\n  "x": null,\n  "y": [\n    null,\n    1.5\n  ]\n}\n'


def test_directory_swap_failure_restores_the_previous_directory(tmp_path, monkeypatch):
    import os

    import covidseg.atomic as atomic

    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    real_replace = os.replace

    def fail_on_swap_in(src, dst):
        if str(src).startswith(str(tmp_path / ".d.")) and dst == target and ".old" not in str(src):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_on_swap_in)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "y").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["x"]


def _killed_writer(target, tmp_path):
    """Start a process that opens an atomic write of ``target`` and hangs; SIGKILL it; return its temp file."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\nfrom covidseg.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n    print(tmp, flush=True)\n    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert tmp, "writer printed no temporary path"
    return tmp


def test_temporary_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    from pathlib import Path

    target = tmp_path / "out.json"
    left = Path(_killed_writer(target, tmp_path))
    assert left.exists() and left.name.startswith(".out.json.") and left.suffix == ".json"
    other = tmp_path / ".other.json.1.abcdefgh.json"  # another target's: not touched by this write
    other.write_text("x")
    write_json(target, {"a": 1})
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out.json"]


def test_sweep_keeps_temporaries_of_live_processes(tmp_path):
    import os
    import subprocess
    import sys

    from covidseg.atomic import sweep_stale_temps

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        names = {
            f".x.png.{os.getpid()}.abcdefgh.png": True,
            f".x.png.{live.pid}.a1b2c3d4.png": True,
            f".x.png.{dead.pid}.zzzzzzzz.png": False,
            ".d.old": True,
            "x.png": True,
            ".hidden": True,
            f".y.{dead.pid}.notarandompart": True,
        }
        for name in names:
            (tmp_path / name).write_text("x")
        (tmp_path / f".d.{dead.pid}.q1w2e3r4").mkdir()  # atomic_dir's temporary folder
        removed = sweep_stale_temps(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in removed) == sorted(
        [f".d.{dead.pid}.q1w2e3r4", *(n for n, keep in names.items() if not keep)]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)


def test_check_writable_names_the_problem(tmp_path):
    from covidseg.atomic import check_writable

    check_writable(tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        check_writable(tmp_path / "file" / "out")
