"""covidseg.runcache: the run records of a clone, and `covidseg push-runs` refusing cleanly without a remote.

The round trip itself (records and outputs reach a teammate) is tests/test_team_run_cache.py.
"""

from __future__ import annotations

from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.runcache import run_entries

from conftest import dvc, run


def test_run_entries_lists_key_and_value_of_each_record(tmp_path):
    runs = tmp_path / "runs"
    for key, value in (("ab12", "v1"), ("ab12", "v2"), ("cd34", "v3")):
        (runs / key[:2] / key).mkdir(parents=True, exist_ok=True)
        (runs / key[:2] / key / value).write_text("cmd: x\n")
    assert run_entries(runs) == [("ab12", "v1"), ("ab12", "v2"), ("cd34", "v3")]
    assert run_entries(tmp_path / "absent") == []


def test_push_runs_without_a_remote_is_one_clear_error(tmp_path, monkeypatch):
    run(["git", "init", "-q"], tmp_path)
    dvc(tmp_path, "init", "-q")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["push-runs"])
    assert result.exit_code == 2
    assert result.output.startswith("error: push-runs:") and "remote" in result.output.lower()
    assert "Traceback" not in result.output


def test_push_runs_with_no_records_uploads_nothing(tmp_path, monkeypatch):
    run(["git", "init", "-q"], tmp_path)
    dvc(tmp_path, "init", "-q")
    dvc(tmp_path, "remote", "add", "-d", "shared", str(tmp_path / "storage"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["push-runs"])
    assert result.exit_code == 0, result.output
    assert "0 run records name 0 objects; 0 uploaded, 0 failed" in result.output
