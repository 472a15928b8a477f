"""Bad params or a bad data.source stop `dvc repro` at the check stage, before DVC removes any output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_PARAMS, dvc, make_repo_copy, run, set_params

KEPT = (
    "data/extracted",
    "data/prepared",
    "metrics/data.json",
    "models/model.pt",
    "metrics/test.json",
    "plots/report.html",
)


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _fails_at_check(repo: Path, *messages: str) -> None:
    lock = (repo / "dvc.lock").read_text()
    proc = dvc(repo, "repro", check=False)
    assert proc.returncode != 0
    assert _ran(proc.stdout) == {"check"}, proc.stdout
    for m in messages:
        assert m in proc.stderr, proc.stderr
    assert "every stage's previous outputs are still in place" in proc.stderr
    for rel in KEPT:
        assert (repo / rel).exists(), f"{rel} was removed by a failed run"
    assert (repo / "dvc.lock").read_text() == lock


def test_bad_params_and_sources_stop_at_check_then_a_valid_lr_change_reruns_only_downstream(tiny_repo, tmp_path):
    dvc(tiny_repo, "repro")

    set_params(tiny_repo, {"train": {"lr": -1}})
    _fails_at_check(tiny_repo, "params 'train': lr must be in (0, 1)")

    set_params(tiny_repo, {"train": {"lr": 0.0001}, "data": {"source": str(tmp_path / "missing.zip")}})
    _fails_at_check(tiny_repo, "missing.zip: data source not found")

    (tmp_path / "empty").mkdir()
    set_params(tiny_repo, {"data": {"source": str(tmp_path / "empty")}})
    _fails_at_check(tiny_repo, "no COVID-QU-Ex infection-segmentation layout found")

    set_params(tiny_repo, {"data": {"source": "data/raw/synthetic"}, "trian": {"lr": 0.001}})
    _fails_at_check(
        tiny_repo, "params.yaml: unknown top-level section(s) ['trian']", "known ones are ['seed', 'launch'"
    )

    text = (tiny_repo / "params.yaml").read_text()
    (tiny_repo / "params.yaml").write_text(text.split("trian:")[0] + "\n")
    set_params(tiny_repo, {"train": {"lr": 0.0005}})
    out = dvc(tiny_repo, "repro").stdout
    assert _ran(out) == {"check", "train", "evaluate", "export", "card", "plots"}, out
    assert "up to date" in dvc(tiny_repo, "status").stdout


def test_extract_failure_says_what_dvc_removed_and_how_to_restore(tiny_repo, tmp_path):
    set_params(tiny_repo, {"data": {"source": str(tmp_path / "gone")}})
    proc = run(["python", "stages/extract.py"], tiny_repo, check=False, env={"PYTHONPATH": ""})
    assert proc.returncode == 1
    assert "previous outputs kept" not in proc.stderr
    assert "DVC removed data/extracted, metrics/data.json and metrics/data_details.json" in proc.stderr, proc.stderr
    assert "git checkout -- metrics/data.json && dvc checkout extract" in proc.stderr


def test_dvc_plots_output_is_ignored():
    assert run(["git", "check-ignore", "-q", "dvc_plots/index.html"], REPO, check=False).returncode == 0


# ---------------------------------------------------------------- docs/recovery.md on a fresh clone

RECOVERY_MD = REPO / "docs" / "recovery.md"


def _recipe(heading: str) -> str:
    """The bash block under ``### {heading}`` in docs/recovery.md, as a user would paste it."""
    text = RECOVERY_MD.read_text(encoding="utf-8")
    section = text.split(f"### {heading}", 1)[1].split("\n#", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def _lock_md5(repo: Path, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path)


@pytest.fixture(scope="module")
def committed_origin(tmp_path_factory) -> tuple[Path, Path]:
    """A repo whose tiny pipeline ran and whose results are committed; its data pushed to a local remote."""
    base = tmp_path_factory.mktemp("recovery")
    origin, storage = base / "origin", base / "storage"
    make_repo_copy(origin, {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 1}})
    dvc(origin, "repro")
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-q", "-m", "results"], origin)
    dvc(origin, "remote", "add", "--local", "-d", "shared", str(storage))  # not committed: clones have no remote
    dvc(origin, "push")
    return origin, storage


@pytest.mark.slow  # three tiny `dvc repro` runs: about 2 minutes on 2 cores
@pytest.mark.parametrize("remote", [True, False], ids=["with_remote", "without_remote"])
def test_recovery_recipe_on_a_fresh_clone(committed_origin, tmp_path, remote: bool):
    origin, storage = committed_origin
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    if remote:
        dvc(clone, "remote", "add", "--local", "-d", "shared", str(storage))
    committed_params = (clone / "params.yaml").read_text()
    # The user tries another learning rate: the clone's model is now that run's, and its cache has
    # never held the committed outputs.
    set_params(clone, {"train": {"lr": 0.0005}})
    dvc(clone, "repro")
    assert (clone / "models" / "model.pt").is_file()
    if not remote:  # the old recipe's failure, the one the docs now steer around
        run(["git", "checkout", "--", "params.yaml", "dvc.lock", "metrics", "plots"], clone)
        failed = dvc(clone, "checkout", check=False)
        assert failed.returncode != 0 and "Is your cache up to date?" in failed.stdout + failed.stderr

    recipe = _recipe("With a DVC remote" if remote else "Without a remote")
    proc = run(["bash", "-euo", "pipefail", "-c", recipe], clone)
    assert "Data and pipelines are up to date." in proc.stdout, proc.stdout + proc.stderr
    assert (clone / "params.yaml").read_text() == committed_params
    assert (clone / "models" / "model.pt").is_file() and (clone / "data" / "prepared").is_dir()
    if remote:  # the committed files themselves
        assert hashlib.md5((clone / "models" / "model.pt").read_bytes()).hexdigest() == _lock_md5(
            origin, "models/model.pt"
        )
        assert run(["git", "status", "--porcelain"], clone).stdout == ""
    # And a no-op `dvc repro` afterwards runs nothing.
    again = dvc(clone, "repro")
    assert "Running stage" not in again.stdout, again.stdout
