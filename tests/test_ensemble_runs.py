"""train.members: an ensemble of independent runs (covidseg.training.run), saved, exported and resumed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from covidseg.evaluation.model_card import render_card
from covidseg.export.stage import export_stage
from covidseg.model.checkpoint import load_model
from covidseg.model.ensemble import UNetEnsemble, mean_probability_logits
from covidseg.params import ExportParams, ParamsError, TrainParams

from helpers import (
    CARD_TEST_DETAILS,
    CARD_TEST_METRICS,
    TINY_TRAIN,
    copy_repo_params,
    train_tiny,
    write_card_per_image,
)

TWO = dataclasses.replace(TINY_TRAIN, epochs=2)


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    """A members=1 run (seed 3), a members=2 run (seeds 3 and 4) and a members=1 run with seed 4."""
    out = tmp_path_factory.mktemp("members")
    train_tiny(tiny_prepared, out / "one", TWO, seed=3)
    train_tiny(tiny_prepared, out / "pair", dataclasses.replace(TWO, members=2), seed=3)
    train_tiny(tiny_prepared, out / "second", TWO, seed=4)
    return out


def test_members_are_the_independent_runs_of_consecutive_seeds(runs):
    pair, meta = load_model(runs / "pair" / "model.pt")
    assert isinstance(pair, UNetEnsemble) and len(pair.members) == 2
    assert meta["member_seeds"] == [3, 4]
    for k, name in enumerate(("one", "second")):
        single, single_meta = load_model(runs / name / "model.pt")
        assert all(
            torch.equal(a, b) for a, b in zip(pair.members[k].state_dict().values(), single.state_dict().values())
        )
        assert meta["member_best_epochs"][k] == single_meta["best_epoch"]


def test_the_ensemble_averages_its_members_probabilities(runs, tiny_prepared):
    pair, _ = load_model(runs / "pair" / "model.pt")
    x = torch.from_numpy(np.load(tiny_prepared / "val.npz")["images"][:3]).float() / 255
    with torch.no_grad():
        z = torch.stack([m(x) for m in pair.members])
        mean_p = torch.sigmoid(z).mean(0)
        assert torch.allclose(torch.sigmoid(pair(x)), mean_p, atol=1e-5)
        assert torch.allclose(pair(x), mean_probability_logits(z))


def test_metrics_give_each_member_and_the_ensemble(runs):
    metrics = json.loads((runs / "pair" / "train.json").read_text())
    singles = [json.loads((runs / n / "train.json").read_text()) for n in ("one", "second")]
    assert metrics["member_seeds"] == [3, 4]
    assert metrics["member_val_dice_at_0.5"] == pytest.approx([s["val_dice_at_0.5"] for s in singles])
    assert 0 <= metrics["val_dice_at_0.5"] <= 1
    log = json.loads((runs / "pair" / "train_log.json").read_text())
    assert len(log["member_train_seconds"]) == 2
    assert log["train_seconds"] == pytest.approx(sum(log["member_train_seconds"]))
    # the stage's curves are member 1's
    assert (runs / "pair" / "curves.tsv").read_text() == (runs / "one" / "curves.tsv").read_text()


def test_kept_members_are_cleared_when_the_stage_ends(runs):
    resume = runs / "pair" / "resume"
    assert not list(resume.rglob("*.pt"))
    assert (resume / "member-2" / "STATUS").read_text().startswith("complete")


def test_a_killed_ensemble_continues_with_the_finished_members_kept(tiny_prepared, runs, tmp_path, caplog):
    params = dataclasses.replace(TWO, members=2)
    seen = []

    def hook(trainer, row):
        seen.append((trainer.seed, row["epoch"]))
        if trainer.seed == 4 and row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_prepared, tmp_path, params, seed=3, on_epoch_end=hook)
    assert (tmp_path / "resume" / "member-1" / "done.pt").is_file()
    (tmp_path / "curves.tsv").unlink()  # as DVC removes a stage's outputs before it runs
    seen.clear()
    with caplog.at_level("INFO", logger="covidseg"):
        train_tiny(tiny_prepared, tmp_path, params, seed=3, on_epoch_end=lambda t, r: seen.append((t.seed, r["epoch"])))
    assert seen == [(4, 2)]  # member 1 reused, member 2 resumed after its epoch 1
    assert any("member-1 finished before" in r.getMessage() for r in caplog.records)
    for name in ("model.pt", "train.json", "curves.tsv"):
        assert (tmp_path / name).read_bytes() == (runs / "pair" / name).read_bytes(), name


def test_a_kept_member_from_other_params_is_trained_again(tiny_prepared, tmp_path):
    def stop_in_member_2(trainer, row):
        if trainer.seed == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_prepared, tmp_path, dataclasses.replace(TWO, members=2), seed=3, on_epoch_end=stop_in_member_2)
    assert (tmp_path / "resume" / "member-1" / "done.pt").is_file()
    seen = []
    train_tiny(
        tiny_prepared,
        tmp_path,
        dataclasses.replace(TWO, members=2, lr=2e-3),
        seed=3,
        on_epoch_end=lambda t, r: seen.append((t.seed, r["epoch"])),
    )
    assert seen == [(3, 1), (3, 2), (4, 1), (4, 2)]


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"members": 0}, "members must be in [1, 10]"),
        ({"members": 11}, "members must be in [1, 10]"),
        ({"members": 2, "snapshots": 2}, "cannot be combined with snapshots"),
    ],
)
def test_bad_members_params_are_refused(overrides, words):
    with pytest.raises(ParamsError, match=words.replace("[", r"\[").replace("]", r"\]")):
        dataclasses.replace(TrainParams(), **overrides).validate()


def test_the_ensemble_exports_to_one_onnx_graph_that_matches_torch(runs, tiny_prepared, tmp_path):
    import onnx

    e = export_stage(runs / "pair" / "model.pt", tiny_prepared, tmp_path / "model.onnx", ExportParams())
    assert e["parity_max_abs_diff"] <= 1e-4  # every test film, calibrated probabilities
    graph = onnx.load(tmp_path / "model.onnx").graph
    one = export_stage(runs / "one" / "model.pt", tiny_prepared, tmp_path / "one.onnx", ExportParams())
    assert one["parity_max_abs_diff"] <= 1e-4
    convs = sum(n.op_type == "Conv" for n in graph.node)
    assert convs == 2 * sum(n.op_type == "Conv" for n in onnx.load(tmp_path / "one.onnx").graph.node)


def test_the_model_card_names_the_members(runs, tmp_path):
    _, meta = load_model(runs / "pair" / "model.pt")
    summary = json.loads((runs / "pair" / "train.json").read_text())
    card = render_card(
        copy_repo_params(tmp_path), meta, CARD_TEST_METRICS, CARD_TEST_DETAILS, summary, write_card_per_image(tmp_path)
    )
    assert "an ensemble of 2 runs (seeds 3, 4; best epochs" in card
