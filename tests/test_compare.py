"""`covidseg compare`: a paired bootstrap of two runs' per-image results, checked on hand-made tables."""

import subprocess

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.evaluation.compare import CompareError, compare, read_run

runner = CliRunner()


def table(values, column="dice_tuned", ids=None) -> pd.DataFrame:
    ids = ids or [f"covid_{i}" for i in range(len(values))]
    return pd.DataFrame({"id": ids, column: values})


def test_a_constant_gain_excludes_zero_by_hand():
    a, b = table([0.8, 0.6, 0.7, 0.9]), table([0.7, 0.5, 0.6, 0.8])
    r = compare(a, b, n_resamples=500)
    assert r.n == 4 and r.mean_a == pytest.approx(0.75) and r.mean_b == pytest.approx(0.65)
    assert r.diff == pytest.approx(0.1) and r.low == pytest.approx(0.1) and r.high == pytest.approx(0.1)
    assert r.excludes_zero and r.verdict == "A is better"


def test_differences_of_both_signs_tie():
    a, b = table([0.8, 0.6, 0.8, 0.6]), table([0.7, 0.7, 0.7, 0.7])  # differences +0.1, -0.1, +0.1, -0.1
    r = compare(a, b, n_resamples=1000)
    assert r.diff == pytest.approx(0.0, abs=1e-12) and r.low < 0 < r.high
    assert r.verdict.startswith("tie")


def test_lower_is_better_for_rmse_and_rows_are_joined_by_id():
    a = table([0.10, 0.20, 0.30], "rmse", ids=["x", "y", "z"])
    b = table([0.35, 0.25, 0.15], "rmse", ids=["z", "y", "x"])  # same images, other order: +0.05 each
    r = compare(a, b, "rmse", n_resamples=300)
    assert r.diff == pytest.approx(-0.05) and r.verdict == "A is better"


def test_nan_images_are_left_out_and_different_splits_refused():
    a, b = table([np.nan, 0.5, 0.7]), table([0.9, 0.4, 0.6])
    r = compare(a, b, n_resamples=200)
    assert r.n == 2 and r.mean_a == pytest.approx(0.6) and r.mean_b == pytest.approx(0.5)
    with pytest.raises(CompareError, match="different images"):
        compare(table([0.5, 0.6]), table([0.5, 0.6], ids=["other_1", "other_2"]))
    with pytest.raises(CompareError, match="no per-image column 'hd99'"):
        compare(a, b, "hd99")


def test_runs_from_files_folders_revisions_and_experiments(tmp_path):
    repo = tmp_path / "repo"
    (repo / "plots/eval").mkdir(parents=True)

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    table([0.5, 0.5, 0.5]).to_csv(repo / "plots/eval/per_image.csv", index=False)
    git("add", "-A")
    git("commit", "-qm", "baseline")
    table([0.6, 0.6, 0.6]).to_csv(repo / "plots/eval/per_image.csv", index=False)
    git("commit", "-qam", "better")
    git("update-ref", "refs/exps/ab/cdef/bright-idea", "HEAD")  # how DVC stores an experiment
    assert read_run("HEAD~1", repo)["dice_tuned"].tolist() == [0.5] * 3
    assert read_run("bright-idea", repo)["dice_tuned"].tolist() == [0.6] * 3
    assert read_run(str(repo), repo)["dice_tuned"].tolist() == [0.6] * 3  # a folder (checkout)
    with pytest.raises(CompareError, match="no-such-run"):
        read_run("no-such-run", repo)
    result = runner.invoke(app, ["compare", "bright-idea", "HEAD~1", "--repo", str(repo), "--resamples", "200"])
    assert result.exit_code == 0, result.output
    assert "A - B +0.1000" in result.stdout and "A is better" in result.stdout
    bad = runner.invoke(app, ["compare", "nothing", "HEAD", "--repo", str(repo)])
    assert bad.exit_code == 2 and "nothing" in bad.output
