"""Stages import the library of the checkout DVC runs them in, not the one the venv was installed from.

A queued experiment runs in a temporary copy of the commit (plus the workspace as it was when
queued). Its code must be that copy's, not the editable install's src/ nor the workspace's later edits.
"""

from __future__ import annotations

from pathlib import Path

from conftest import dvc, make_repo_copy, run
from helpers import dvc_experiments, wait_for_dvc_queue

LINE = "write_json(metrics_tmp, report.headline() | unlabeled_count)"


def _mark(repo: Path, marker: str) -> None:
    """Make extract put ``marker`` into metrics/data.json."""
    path = repo / "src/covidseg/data/extract.py"
    text = path.read_text()
    old = LINE if LINE in text else f'{LINE[:-1]} | {{"marker": "committed"}})'
    assert old in text, "extract no longer writes its metrics as this test expects"
    path.write_text(text.replace(old, f'{LINE[:-1]} | {{"marker": "{marker}"}})'))


def test_queued_experiment_runs_its_own_committed_code(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)  # as in CI: only the editable install points at a src/
    repo = make_repo_copy(tmp_path / "repo")
    _mark(repo, "committed")
    run(["git", "commit", "-qam", "marker"], repo)

    dvc(repo, "exp", "run", "--queue", "-n", "marked", "-S", "preprocess.image_size=32", "extract")
    _mark(repo, "workspace")  # edited while the experiment waits
    dvc(repo, "queue", "start", "-j", "1")
    status = wait_for_dvc_queue(repo)
    assert "Success" in status, status + dvc(repo, "queue", "logs", "marked", check=False).stdout[-3000:]

    data = dvc_experiments(repo)["marked"]["data"]["metrics"]["metrics/data.json"]["data"]
    assert data.get("marker") == "committed", f"experiment ran other code: marker {data.get('marker')!r}"
