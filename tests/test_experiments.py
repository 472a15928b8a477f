"""Queued experiments from a committed repo: a two-point grid, run by the queue, compared by metrics and plots.

Queued experiments run in a temporary copy of the last commit, so they see only Git- and
DVC-tracked files: this holds the pipeline to building everything it needs from what a clone has.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY_PARAMS, dvc, make_repo_copy
from helpers import dvc_experiments, wait_for_dvc_queue

pytestmark = pytest.mark.slow  # 2 minutes each on 2 cores: `make test-all` runs them

LRS = ("0.001", "0.003")


def test_queued_grid_then_compare(tmp_path):
    params = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": 1}}
    repo = make_repo_copy(tmp_path / "repo", params)

    # A grid: comma-separated values in one -S give one queued experiment per value.
    dvc(repo, "exp", "run", "--queue", "-S", f"train.lr={','.join(LRS)}", "-S", "train.loss=bce")
    status = dvc(repo, "queue", "status").stdout
    assert status.count("Queued") == len(LRS), status

    # The worker inherits the captured output pipes, so this returns once the worker has drained the
    # queue and shut down (DVC stops an idle worker after 10 s): no worker outlives the test.
    dvc(repo, "queue", "start", "-j", "1")
    status = wait_for_dvc_queue(repo)
    try:
        assert status.count("Success") == len(LRS), status
        assert "Failed" not in status, status
    except AssertionError:
        logs = "\n".join(
            dvc(repo, "queue", "logs", line.split()[0], check=False).stdout[-3000:]
            for line in status.splitlines()[1:]
            if line.strip() and "Failed" in line
        )
        raise AssertionError(f"{status}\n{logs}") from None

    exps = dvc_experiments(repo)
    by_lr = {str(e["data"]["params"]["params.yaml"]["data"]["train"]["lr"]): name for name, e in exps.items()}
    assert {float(v) for v in by_lr} == {float(v) for v in LRS}, exps.keys()
    first, second = (by_lr[k] for k in sorted(by_lr, key=float))
    for name in (first, second):
        metrics = exps[name]["data"]["metrics"]
        assert "val_dice_at_threshold" in metrics["metrics/train.json"]["data"]
        assert metrics["metrics/test.json"]["data"], name

    # Metrics across the two experiments.
    diff = json.loads(dvc(repo, "metrics", "diff", first, second, "--all", "--json").stdout)
    assert "val_dice_at_threshold" in diff["metrics/train.json"]
    assert diff["metrics/test.json"]

    # Plots across the two experiments: the curves (one line per experiment) and the figures, side by side.
    plots = json.loads(dvc(repo, "plots", "diff", first, second, "--json", "-o", str(tmp_path / "plots")).stdout)[
        "data"
    ]
    assert {"loss", "val_dice"} <= set(plots), sorted(plots)
    loss_revs = {rev for entry in plots["loss"] for rev in entry.get("revisions", [])}
    assert {first, second} <= loss_revs, loss_revs
    images = [k for k in plots if k.startswith("plots/figures/")]
    assert images, sorted(plots)
    image_revs = {rev for k in images for entry in plots[k] for rev in entry.get("revisions", [])}
    assert {first, second} <= image_revs, image_revs
    assert any((tmp_path / "plots").rglob("*.png"))
