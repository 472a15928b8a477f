"""Shared fixtures: the real dev data (skipped when absent) and tiny copies of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEV_DATA = REPO.parent / "shared" / "data" / "covidqu-dev"
VENV_BIN = Path(sys.executable).parent

# Small enough that a whole `dvc repro` takes well under a minute on 2 cores.
TINY_PARAMS = {
    "synth": {"train": 6, "val": 3, "test": 3, "negatives": 1, "image_size": 64},
    "preprocess": {"image_size": 64},
    "train": {"epochs": 2, "base_channels": 4, "depth": 3, "downsample": 1, "batch_size": 4},
    "plots": {"gallery_size": 2, "dpi": 50},
}


@pytest.fixture
def dev_data() -> Path:
    """The real COVID-QU-Ex dev folder; the test is skipped when it is not there."""
    if not DEV_DATA.is_dir():
        pytest.skip(f"real data not found at {DEV_DATA} (a fresh clone has no ../shared)")
    return DEV_DATA


def tracked_files(repo: Path = REPO) -> list[str]:
    """Files git tracks (and untracked, not ignored ones), so a copy is what a clone would hold."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout
    return [f for f in out.splitlines() if (repo / f).is_file()]


def set_params(repo: Path, overrides: dict) -> None:
    """Deep-merge ``overrides`` into ``repo/params.yaml``."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        if isinstance(values, dict):
            params.setdefault(section, {}).update(values)
        else:
            params[section] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command with the test venv first on PATH (stage commands say `python`)."""
    full_env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {}))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def make_repo_copy(dest: Path, params: dict | None = None) -> Path:
    """Copy the project (as a clone would have it, without DVC outputs) into a new git repo at ``dest``."""
    for rel in tracked_files():
        if rel.startswith(("metrics/", "plots/", "models/resume/")) or rel in ("dvc.lock", "models/MODEL_CARD.md"):
            continue  # results of the real pipeline: the copy makes its own
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    set_params(dest, TINY_PARAMS if params is None else params)
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "covidseg test"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "copy"], dest)
    return dest


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A git + DVC repo copy of the project with TINY_PARAMS, nothing run yet."""
    return make_repo_copy(tmp_path / "repo")


def dvc(repo: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the venv's dvc in ``repo``."""
    return run([str(VENV_BIN / "dvc"), *args], cwd=repo, check=check, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """Prepared arrays (train/val/test .npz at 64 px) made by the real synthesize/extract/preprocess functions."""
    from covidseg.data.extract import extract
    from covidseg.data.preprocess import preprocess
    from covidseg.data.synth import synthesize
    from covidseg.params import DataParams, PreprocessParams, SynthParams

    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "raw", SynthParams(train=8, val=4, test=4, negatives=1, image_size=64), seed=7)
    extract(
        root / "raw",
        root / "extracted",
        root / "data.json",
        DataParams(source=str(root / "raw"), classes=("COVID-19", "Normal")),
    )
    preprocess(root / "extracted", root / "prepared", PreprocessParams(image_size=64))
    return root / "prepared"
