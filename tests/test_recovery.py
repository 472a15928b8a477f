"""Bad params or a bad data.source stop `dvc repro` at the check stage, before DVC removes any output."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, dvc, run, set_params

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
    assert "git checkout -- metrics/data.json metrics/data_details.json && dvc checkout extract" in proc.stderr


def test_dvc_plots_output_is_ignored():
    assert run(["git", "check-ignore", "-q", "dvc_plots/index.html"], REPO, check=False).returncode == 0
