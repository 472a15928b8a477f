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
    r = compare(a, b, n_resamples=500, min_paired=2)
    assert r.n == 4 and r.mean_a == pytest.approx(0.75) and r.mean_b == pytest.approx(0.65)
    assert r.diff == pytest.approx(0.1) and r.low == pytest.approx(0.1) and r.high == pytest.approx(0.1)
    assert r.excludes_zero and r.verdict == "A is better"


def test_differences_of_both_signs_tie():
    a, b = table([0.8, 0.6, 0.8, 0.6]), table([0.7, 0.7, 0.7, 0.7])  # differences +0.1, -0.1, +0.1, -0.1
    r = compare(a, b, n_resamples=1000, min_paired=2)
    assert r.diff == pytest.approx(0.0, abs=1e-12) and r.low < 0 < r.high
    assert r.verdict.startswith("tie")


def test_lower_is_better_for_rmse_and_rows_are_joined_by_id():
    a = table([0.10, 0.20, 0.30], "rmse", ids=["x", "y", "z"])
    b = table([0.35, 0.25, 0.15], "rmse", ids=["z", "y", "x"])  # same images, other order: +0.05 each
    r = compare(a, b, "rmse", n_resamples=300, min_paired=2)
    assert r.diff == pytest.approx(-0.05) and r.verdict == "A is better"


@pytest.mark.parametrize("column", ["pred_fraction", "infected_fraction", "true_fraction"])
def test_a_column_without_a_direction_says_higher_or_lower_not_better(column):
    """A predicted area (or a predict table's infected share) is not better when larger, nor when smaller."""
    a, b = table([0.3, 0.4, 0.5], column), table([0.2, 0.3, 0.4], column)
    assert compare(a, b, column, n_resamples=200, min_paired=2).verdict == "A is higher"
    assert compare(b, a, column, n_resamples=200, min_paired=2).verdict == "A is lower"
    for known, verdict in (
        ("iou_fixed", "A is better"),
        ("recall_tuned", "A is better"),
        ("hd95_fixed", "B is better"),
    ):
        assert (
            compare(
                table([0.3, 0.4, 0.5], known), table([0.2, 0.3, 0.4], known), known, n_resamples=200, min_paired=2
            ).verdict
            == verdict
        )


def test_nan_images_are_left_out_and_different_splits_refused():
    a, b = table([np.nan, 0.5, 0.7]), table([0.9, 0.4, 0.6])
    r = compare(a, b, n_resamples=200, min_paired=2)
    assert r.n == 2 and r.mean_a == pytest.approx(0.6) and r.mean_b == pytest.approx(0.5)
    with pytest.raises(CompareError, match="different images"):
        compare(table([0.5, 0.6]), table([0.5, 0.6], ids=["covid_0", "other_2"]))
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
    table([0.5] * 12).to_csv(repo / "plots/eval/per_image.csv", index=False)
    git("add", "-A")
    git("commit", "-qm", "baseline")
    table([0.6] * 12).to_csv(repo / "plots/eval/per_image.csv", index=False)
    git("commit", "-qam", "better")
    git("update-ref", "refs/exps/ab/cdef/bright-idea", "HEAD")  # how DVC stores an experiment
    assert read_run("HEAD~1", repo)["dice_tuned"].tolist() == [0.5] * 12
    assert read_run("bright-idea", repo)["dice_tuned"].tolist() == [0.6] * 12
    assert read_run(str(repo), repo)["dice_tuned"].tolist() == [0.6] * 12  # a folder (checkout)
    with pytest.raises(CompareError, match="no-such-run"):
        read_run("no-such-run", repo)
    result = runner.invoke(app, ["compare", "bright-idea", "HEAD~1", "--repo", str(repo), "--resamples", "200"])
    assert result.exit_code == 0, result.output
    assert "A - B +0.1000" in result.stdout and "A is better" in result.stdout
    bad = runner.invoke(app, ["compare", "nothing", "HEAD", "--repo", str(repo)])
    assert bad.exit_code == 2 and "nothing" in bad.output


def _csv(path, frame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def _refused(*args) -> str:
    result = runner.invoke(app, ["compare", *args, "--resamples", "100"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    return result.output


def test_duplicate_ids_are_refused_naming_the_file_not_cross_joined(tmp_path):
    twice = pd.concat([table([0.5] * 12), table([0.5] * 12)])  # a 12-image table holding every row twice
    out = _refused(_csv(tmp_path / "dup.csv", twice), _csv(tmp_path / "ok.csv", table([0.6] * 12)))
    assert "dup.csv" in out and "more than once" in out


def test_no_shared_ids_too_few_pairs_and_all_nan_are_refused(tmp_path):
    a = _csv(tmp_path / "a.csv", table([0.5] * 12))
    other = _csv(tmp_path / "other.csv", table([0.5] * 12, ids=[f"x{i}" for i in range(12)]))
    assert "no image id in common" in _refused(a, other)
    few = _csv(tmp_path / "few.csv", table([0.5] * 4))
    assert "a paired interval needs at least 10" in _refused(few, _csv(tmp_path / "few2.csv", table([0.6] * 4)))
    nan = _csv(tmp_path / "nan.csv", table([np.nan] * 12))
    assert "only 0 of 12 images" in _refused(nan, a)


def test_a_text_column_an_unknown_column_and_a_missing_repo_are_refused(tmp_path):
    a = _csv(tmp_path / "a.csv", table([0.5] * 12))
    text = _csv(tmp_path / "text.csv", table(["good"] * 12))
    out = _refused(text, a)
    assert "text.csv" in out and "non-numeric" in out and "'good'" in out
    out = _refused(a, a, "--metric", "hd99")
    assert "a.csv" in out and "no per-image column 'hd99'" in out
    out = _refused("some-experiment", a, "--repo", str(tmp_path / "nonexistent"))
    assert "nonexistent" in out and "no such folder" in out


def test_an_experiment_name_that_several_experiments_have_lists_them(tmp_path):
    repo = tmp_path / "repo"
    (repo / "plots/eval").mkdir(parents=True)
    for args in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    table([0.5] * 12).to_csv(repo / "plots/eval/per_image.csv", index=False)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "run"], cwd=repo, check=True)
    for ref in ("refs/exps/ab/cdef/real-preset", "refs/exps/12/3456/real-preset"):
        subprocess.run(["git", "update-ref", ref, "HEAD"], cwd=repo, check=True)
    with pytest.raises(CompareError, match=r"real-preset: 2 experiments have this name; name one by its commit"):
        read_run("real-preset", repo)


def test_small_differences_print_with_the_digits_to_read_them(tmp_path):
    base = np.linspace(0.5, 0.7, 20)
    a = _csv(tmp_path / "a.csv", table(list(base + 1e-5)))
    b = _csv(tmp_path / "b.csv", table(list(base)))
    result = runner.invoke(app, ["compare", a, b, "--resamples", "100"])
    assert result.exit_code == 0, result.output
    assert "A - B +0.000010" in result.stdout and "-0.0000" not in result.stdout


def test_predict_tables_compare_by_stem(tmp_path):
    rows = [{"stem": f"film{i}", "infected_fraction": 0.1 + 0.01 * i} for i in range(12)]
    a = _csv(tmp_path / "a.csv", pd.DataFrame(rows))
    b = _csv(
        tmp_path / "b.csv", pd.DataFrame([{**r, "infected_fraction": r["infected_fraction"] - 0.02} for r in rows])
    )
    result = runner.invoke(app, ["compare", a, b, "--metric", "infected_fraction", "--resamples", "100"])
    assert result.exit_code == 0, result.output
    assert "over 12 images" in result.stdout and "A - B +0.0200" in result.stdout
