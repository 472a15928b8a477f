"""train.unlabeled: self-training's pseudo-labels by hand, and the teacher -> student run end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from covidseg.inference.calibration import Calibration
from covidseg.params import ParamsError, TrainParams
from covidseg.training.loop import seeded_subset
from covidseg.training.self_training import mask_dice, pseudo_label, reliable_subset

from conftest import dvc, set_params
from helpers import TINY_TRAIN, train_tiny

TWO = dataclasses.replace(TINY_TRAIN, epochs=2, max_train_images=4)
SELF = dataclasses.replace(TWO, unlabeled="rest_of_train", pseudo_keep=0.6)


# ------------------------------------------------------------------------------------------ by hand


def test_mask_dice_by_hand_including_empty_and_full_masks():
    a = np.zeros((4, 2, 2), bool)
    b = np.zeros((4, 2, 2), bool)
    a[1, 0, 0] = True  # film 1: one pixel against none -> 0
    a[2] = b[2] = True  # film 2: all ones on both -> 1
    a[3, 0] = True  # film 3: 2 pixels against 1 of them -> 2 * 1 / 3
    b[3, 0, 0] = True
    np.testing.assert_allclose(mask_dice(a, b), [1.0, 0.0, 1.0, 2 / 3])  # film 0: both empty agree


def test_reliable_subset_keeps_the_most_stable_share_in_index_order():
    stability = np.array([0.2, 0.9, 0.9, 0.5, 1.0])
    assert reliable_subset(stability, 0.6).tolist() == [1, 2, 4]
    assert reliable_subset(stability, 0.4).tolist() == [1, 4]  # of the tied 0.9s the first
    assert reliable_subset(stability, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert reliable_subset(np.zeros(0), 0.5).tolist() == []


class _LeftHalf(nn.Module):
    """Ignores its input: infection logit +4 on the left half of the film, -4 on the right; lung logit +4."""

    config = type("Config", (), {"out_channels": 2})()

    def forward(self, x):
        z = torch.full((x.shape[0], 2, x.shape[2], x.shape[3]), 4.0)
        z[:, 0, :, x.shape[3] // 2 :] = -4.0
        return z


def test_pseudo_labels_and_flip_stability_of_a_model_that_ignores_its_input():
    images = np.zeros((3, 1, 4, 4), np.uint8)
    cal = Calibration(threshold=0.6, temperature=2.0)
    labels, stability = pseudo_label(_LeftHalf(), cal, images, torch.device("cpu"), "fp32", 2)
    # mirrored back, its left-half mask is the right half: the two masks are disjoint
    np.testing.assert_allclose(stability, [0.0, 0.0, 0.0])
    # the flip average is logit 0 everywhere: probability 0.5, below the threshold 0.6
    assert labels.shape == (3, 1, 4, 4) and labels.dtype == np.uint8 and labels.sum() == 0
    labels, _ = pseudo_label(_LeftHalf(), Calibration(threshold=0.5), images, torch.device("cpu"), "fp32", 2)
    assert labels.sum() == 3 * 16  # probability 0.5 is at the threshold: infected


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"unlabeled": "web"}, "unlabeled must be one of"),
        ({"unlabeled": "rest_of_train"}, "needs max_train_images > 0"),
        ({"unlabeled": "archive", "members": 2}, "cannot be combined with members"),
        ({"unlabeled": "archive", "snapshots": 2}, "cannot be combined with snapshots"),
        ({"pseudo_keep": 0.0}, "pseudo_keep must be in"),
        ({"pseudo_keep": 1.5}, "pseudo_keep must be in"),
    ],
)
def test_bad_self_training_params_are_refused(overrides, words):
    with pytest.raises(ParamsError, match=words):
        dataclasses.replace(TrainParams(), **overrides).validate()


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def self_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("self")
    train_tiny(tiny_prepared, out / "plain", TWO, seed=5)
    summary = train_tiny(tiny_prepared, out / "self", SELF, seed=5)
    return out, summary


def test_the_teacher_is_the_labelled_only_run_and_the_student_sees_the_kept_films(self_run, tiny_prepared):
    out, summary = self_run
    plain = json.loads((out / "plain" / "train.json").read_text())
    total = len(np.load(tiny_prepared / "train.npz")["images"])
    unlabeled = total - 4
    assert summary["labelled_images"] == 4 and summary["unlabeled_images"] == unlabeled
    assert summary["pseudo_labelled_images"] == int(np.ceil(0.6 * unlabeled))
    assert summary["train_images"] == 4 + summary["pseudo_labelled_images"]
    assert summary["teacher_val_dice"] == pytest.approx(plain["val_dice_at_threshold"])
    assert summary["teacher_best_epoch"] == plain["best_epoch"]
    metrics = json.loads((out / "self" / "train.json").read_text())
    assert metrics["pseudo_labelled_images"] == summary["pseudo_labelled_images"]
    assert not list((out / "self" / "resume").rglob("*.pt"))


def test_the_hidden_infection_masks_never_reach_training(self_run, tiny_prepared, tmp_path):
    out, _ = self_run
    shutil.copytree(tiny_prepared, tmp_path / "prepared")
    with np.load(tiny_prepared / "train.npz") as z:
        train = {k: z[k] for k in z.files}
    hidden = np.setdiff1d(np.arange(len(train["images"])), seeded_subset(len(train["images"]), 4, 5))
    train["masks"][hidden] = np.random.default_rng(0).integers(0, 2, train["masks"][hidden].shape, dtype=np.uint8)
    np.savez(tmp_path / "prepared" / "train.npz", **train)
    train_tiny(tmp_path / "prepared", tmp_path / "run", SELF, seed=5)
    assert (tmp_path / "run" / "model.pt").read_bytes() == (out / "self" / "model.pt").read_bytes()


def test_archive_films_come_from_the_prepared_unlabeled_split(tiny_prepared, tmp_path):
    shutil.copytree(tiny_prepared, tmp_path / "prepared")
    params = dataclasses.replace(TWO, unlabeled="archive", max_train_images=0, pseudo_keep=1.0)
    with pytest.raises(FileNotFoundError, match="unlabeled.npz: not found; train.unlabeled: archive needs"):
        train_tiny(tmp_path / "prepared", tmp_path / "run", params)
    with np.load(tiny_prepared / "test.npz") as z:
        np.savez(tmp_path / "prepared" / "unlabeled.npz", images=z["images"], lungs=z["lungs"], ids=z["ids"])
    summary = train_tiny(tmp_path / "prepared", tmp_path / "run", params)
    n_test = len(np.load(tiny_prepared / "test.npz")["images"])
    assert summary["unlabeled_images"] == summary["pseudo_labelled_images"] == n_test
    assert summary["train_images"] == len(np.load(tiny_prepared / "train.npz")["images"]) + n_test


def test_a_killed_student_keeps_its_teacher(self_run, tiny_prepared, tmp_path, caplog):
    out, _ = self_run
    calls = []

    def stop_in_student(trainer, row):
        calls.append(len(trainer.train_x))
        if len(trainer.train_x) > 4:  # the student: labelled and pseudo-labelled films
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_prepared, tmp_path, SELF, seed=5, on_epoch_end=stop_in_student)
    assert calls[:2] == [4, 4] and (tmp_path / "resume" / "teacher" / "done.pt").is_file()
    with caplog.at_level("INFO", logger="covidseg"):
        train_tiny(tiny_prepared, tmp_path, SELF, seed=5)
    assert any("teacher finished before" in r.getMessage() for r in caplog.records)
    for name in ("model.pt", "train.json", "curves.tsv"):
        assert (tmp_path / name).read_bytes() == (out / "self" / name).read_bytes(), name


def test_dvc_repro_self_trains_on_the_synthetic_archives_lung_half(tiny_repo):
    set_params(tiny_repo, {"synth": {"unlabeled": 5}, "data": {"unlabeled": True}, "train": {"unlabeled": "archive"}})
    dvc(tiny_repo, "repro", "train")
    data = json.loads((tiny_repo / "metrics" / "data.json").read_text())
    assert data["unlabeled_images"] == 5  # the infection half's copies were matched by pixels and left out
    metrics = json.loads((tiny_repo / "metrics" / "train.json").read_text())
    assert metrics["unlabeled_images"] == 5 and metrics["pseudo_labelled_images"] == 4  # ceil(0.8 x 5)
    assert metrics["train_images"] == metrics["labelled_images"] + 4
