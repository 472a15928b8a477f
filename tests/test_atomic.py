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
