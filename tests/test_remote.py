"""Sharing through a DVC remote: a teammate's clone pulls results and reruns nothing; experiments travel both ways.

Layout (all local folders, no network):
    origin.git   a bare Git repository, the team's Git server
    remote/      the DVC remote (a local folder; S3 or GCS behave the same)
    a/           the first user: runs the pipeline, pushes Git and data (with the run cache)
    b/           a teammate's clone of origin: `dvc pull`, a no-op `dvc repro`, an experiment
    c/           another clone: `dvc repro --pull` alone, also without running anything
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_PARAMS, dvc, make_repo_copy, run

pytestmark = pytest.mark.slow  # 2 minutes each on 2 cores: `make test-all` runs them

TINY_TRAIN = {"epochs": 1}  # on top of TINY_PARAMS: one epoch is enough to move data around


def _git(repo: Path, *args: str) -> str:
    return run(["git", *args], cwd=repo).stdout


def _clone(origin: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", "-b", "main", str(origin), str(dest)], cwd=origin.parent)
    _git(dest, "config", "user.email", "teammate@example.com")
    _git(dest, "config", "user.name", "teammate")
    return dest


def _assert_nothing_ran(proc) -> None:
    out = proc.stdout + proc.stderr
    assert "Running stage" not in out, out
    assert "didn't change, skipping" in out, out


def _exp_names(show_json: str) -> dict[str, dict]:
    """{experiment name: its data} from `dvc exp show --json` (DVC 3: a list of baselines with `experiments`)."""
    found = {}
    for baseline in json.loads(show_json):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = rev.get("data") or {}
    return found


def test_push_pull_run_cache_and_shared_experiments(tmp_path):
    params = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], **TINY_TRAIN}}
    origin, storage = tmp_path / "origin.git", tmp_path / "remote"
    a = make_repo_copy(tmp_path / "a", params)

    # User A: run, configure the shared DVC remote (committed), push data + run cache and Git.
    dvc(a, "repro")
    dvc(a, "remote", "add", "-d", "shared", str(storage))
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "results and shared remote")
    dvc(a, "push", "--run-cache")
    assert (storage / "files" / "md5").is_dir() and (storage / "runs").is_dir()
    run(["git", "init", "-q", "--bare", str(origin)], cwd=tmp_path)
    _git(a, "branch", "-M", "main")
    _git(a, "remote", "add", "origin", str(origin))
    _git(a, "push", "-q", "origin", "main")

    # Teammate B: clone, pull, and `dvc repro` reruns nothing.
    b = _clone(origin, tmp_path / "b")
    assert not (b / "models" / "model.pt").exists()
    dvc(b, "pull")
    assert (b / "models" / "model.pt").is_file()
    assert "up to date" in dvc(b, "status").stdout
    _assert_nothing_ran(dvc(b, "repro"))
    assert _git(b, "status", "--porcelain") == ""

    # Teammate C: `dvc repro --pull` alone fetches what it lacks instead of recomputing it.
    c = _clone(origin, tmp_path / "c")
    _assert_nothing_ran(dvc(c, "repro", "--pull"))
    assert (c / "models" / "model.pt").is_file()
    assert "up to date" in dvc(c, "status").stdout

    # B tries a learning rate as a named experiment and shares it (Git refs to origin, data to the DVC remote).
    dvc(b, "exp", "run", "-n", "lr-high", "-S", "train.lr=0.001")
    assert "lr-high" in dvc(b, "exp", "list", "--name-only").stdout
    dvc(b, "exp", "push", "origin", "lr-high")

    # A sees it on origin, pulls it, and compares it with the baseline.
    assert "lr-high" in dvc(a, "exp", "list", "origin", "--name-only").stdout
    assert "lr-high" not in dvc(a, "exp", "list", "--name-only").stdout
    dvc(a, "exp", "pull", "origin", "lr-high")
    exps = _exp_names(dvc(a, "exp", "show", "--json").stdout)
    assert "lr-high" in exps
    data = exps["lr-high"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.001
    assert "val_dice_at_threshold" in data["metrics"]["metrics/train.json"]["data"]
    assert data["metrics"]["metrics/test.json"]["data"]
    # The experiment's data came along: applying it leaves nothing to recompute or fetch.
    dvc(a, "exp", "apply", "lr-high")
    assert "up to date" in dvc(a, "status").stdout
