import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import covidseg.training.loop as train_mod
from covidseg.inference.forward import predict_logits
from covidseg.model.checkpoint import load_model
from covidseg.params import TrainParams
from covidseg.training.calibration import tune_temperature, tune_threshold, val_scores
from covidseg.training.loop import TrainingDiverged, lr_at
from covidseg.training.run import train
from covidseg.training.selection import BestEpoch

from conftest import REPO, run
from helpers import TINY_TRAIN, capture_logs, interrupt_after, log_lines, train_tiny


def _curves(path):
    return pd.read_csv(path, sep="\t")


def test_outputs_and_summary(tiny_prepared, tmp_path):
    summary = train_tiny(tiny_prepared, tmp_path)
    curves = pd.read_csv(tmp_path / "curves.tsv", sep="\t")
    assert list(curves["epoch"]) == [1, 2, 3]
    assert {"train_loss", "val_loss", "train_rmse", "val_rmse", "val_dice", "val_iou"} <= set(curves.columns)
    model, meta = load_model(tmp_path / "model.pt")
    assert model.config.out_channels == 2  # infection + lung auxiliary head
    assert meta["size"] == 64 and 0 < meta["threshold"] < 1 and meta["temperature"] == 1.0
    assert meta["flip_tta"] is False and summary["flip_tta"] is False
    assert 1 <= summary["best_epoch"] <= 3
    assert summary["val_dice_at_0.5"] == pytest.approx(curves["val_dice"].max(), abs=1e-5)  # best, not last
    assert not (tmp_path / "resume" / "state.pt").exists()  # a finished run leaves no resume state


def test_flip_averaging_calibrates_on_flipped_val_and_is_saved(tiny_prepared, tmp_path):
    params = dataclasses.replace(TINY_TRAIN, epochs=1, flip_tta=True, temperature_scaling=True)
    summary = train_tiny(tiny_prepared, tmp_path, params)
    model, meta = load_model(tmp_path / "model.pt")
    assert meta["flip_tta"] is True and summary["flip_tta"] is True
    with np.load(tiny_prepared / "val.npz") as z:
        images, masks = z["images"], z["masks"]
    for tta in (True, False):
        logits = predict_logits(model, images, torch.device("cpu"), "fp32", flip_tta=tta, lung_gate=meta["lung_gate"])
        if tta:  # the saved temperature is the one fitted on flip-averaged val logits
            assert meta["temperature"] == tune_temperature(logits, masks)
            assert summary["val_rmse"] == pytest.approx(
                val_scores(logits, masks, meta["threshold"], meta["temperature"])["sse"] ** 0.5 / masks.size**0.5,
                rel=1e-6,
            )


@pytest.mark.parametrize("forced, expected", [("0", "fp32"), ("1", "bf16")])
def test_auto_precision_follows_the_capability_and_the_model_file_records_it(
    tiny_prepared, tmp_path, monkeypatch, forced, expected
):
    """Both branches of train.precision=auto on any CPU (the capability forced); fp32 stays fp32 when forced on."""
    monkeypatch.setenv("COVIDSEG_NATIVE_BF16", forced)
    auto = train_tiny(tiny_prepared, tmp_path / "auto", dataclasses.replace(TINY_TRAIN, epochs=1, precision="auto"))
    assert (
        auto["precision"] == expected and load_model(tmp_path / "auto" / "model.pt")[1]["train_precision"] == expected
    )
    fixed = train_tiny(tiny_prepared, tmp_path / "fp32", dataclasses.replace(TINY_TRAIN, epochs=1))
    assert fixed["precision"] == "fp32" and load_model(tmp_path / "fp32" / "model.pt")[1]["train_precision"] == "fp32"


def test_same_seed_same_curves_and_weights(tiny_prepared, tmp_path):
    train_tiny(tiny_prepared, tmp_path / "a")
    train_tiny(tiny_prepared, tmp_path / "b")
    train_tiny(tiny_prepared, tmp_path / "c", seed=1)
    pd.testing.assert_frame_equal(_curves(tmp_path / "a" / "curves.tsv"), _curves(tmp_path / "b" / "curves.tsv"))
    wa, wb = (torch.load(tmp_path / n / "model.pt", weights_only=True)["state_dict"] for n in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not _curves(tmp_path / "a" / "curves.tsv").equals(_curves(tmp_path / "c" / "curves.tsv"))


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(tiny_prepared, tmp_path, ema_decay, caplog):
    params = dataclasses.replace(TINY_TRAIN, ema_decay=ema_decay)
    train_tiny(tiny_prepared, tmp_path / "full", params)
    with pytest.raises(KeyboardInterrupt):
        # Ctrl-C once epoch 2 is saved
        train_tiny(tiny_prepared, tmp_path / "cut", params, on_epoch_end=interrupt_after(2))
    assert (tmp_path / "cut" / "resume" / "state.pt").exists()
    assert list(pd.read_csv(tmp_path / "cut" / "curves.tsv", sep="\t")["epoch"]) == [1, 2]
    capture_logs(caplog)
    train(
        tiny_prepared,
        tmp_path / "cut" / "model.pt",
        tmp_path / "cut" / "resume",
        tmp_path / "cut" / "curves.tsv",
        tmp_path / "cut" / "train.json",
        params,
        0,
    )
    assert any("continuing after epoch 2" in line for line in log_lines(caplog))
    pd.testing.assert_frame_equal(_curves(tmp_path / "full" / "curves.tsv"), _curves(tmp_path / "cut" / "curves.tsv"))
    wa, wb = (torch.load(tmp_path / n / "model.pt", weights_only=True)["state_dict"] for n in ("full", "cut"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_weight_average_is_validated_and_kept_while_training_is_untouched(tiny_prepared, tmp_path):
    train_tiny(tiny_prepared, tmp_path / "raw")
    kept = {}

    def remember_average(trainer, row):  # the average as validated this epoch (val does not change it)
        kept[row["epoch"]] = {k: v.clone() for k, v in trainer.ema.model.state_dict().items()}

    summary = train_tiny(
        tiny_prepared, tmp_path / "ema", dataclasses.replace(TINY_TRAIN, ema_decay=0.9), on_epoch_end=remember_average
    )
    raw, ema = _curves(tmp_path / "raw" / "curves.tsv"), _curves(tmp_path / "ema" / "curves.tsv")
    pd.testing.assert_series_equal(
        raw["train_loss"], ema["train_loss"]
    )  # the raw weights train exactly as without averaging
    assert not np.allclose(raw["val_loss"], ema["val_loss"])  # validation sees the averaged weights
    saved = torch.load(tmp_path / "ema" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], kept[summary["best_epoch"]][k]) for k in saved)  # the best epoch's average is kept


def test_resume_state_from_other_params_is_ignored(tiny_prepared, tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_prepared, tmp_path, on_epoch_end=interrupt_after(1))
    capture_logs(caplog)
    train_tiny(tiny_prepared, tmp_path, dataclasses.replace(TINY_TRAIN, lr=5e-4))
    assert any("starting afresh" in line for line in log_lines(caplog))
    assert list(pd.read_csv(tmp_path / "curves.tsv", sep="\t")["epoch"]) == [1, 2, 3]


def test_killed_process_resumes_from_last_finished_epoch(tiny_prepared, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\ntrain:\n  epochs: 40\n  batch_size: 4\n  base_channels: 4\n  depth: 3\n")
    args = [
        sys.executable,
        str(REPO / "stages" / "train.py"),
        "--prepared",
        str(tiny_prepared),
        "--model",
        str(tmp_path / "m.pt"),
        "--resume",
        str(tmp_path / "resume"),
        "--curves",
        str(tmp_path / "c.tsv"),
        "--metrics",
        str(tmp_path / "t.json"),
        "--params",
        str(params),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "resume" / "state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(pd.read_csv(tmp_path / "c.tsv", sep="\t"))
    assert 1 <= done < 40 and not (tmp_path / "m.pt").exists()
    out = run(args, cwd=REPO, timeout=600).stderr  # the log goes to stderr, the stage's result line to stdout
    assert "resume: continuing after epoch" in out
    assert list(pd.read_csv(tmp_path / "c.tsv", sep="\t")["epoch"]) == list(range(1, 41))


def test_nan_loss_stops_with_a_clear_message(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "make_loss", lambda *a, **k: lambda logits, target: logits.mean() * float("nan"))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, step 1; lower train.lr"):
        train_tiny(tiny_prepared, tmp_path)
    assert not (tmp_path / "model.pt").exists()


def test_early_stopping_keeps_the_best_epoch():
    best, stopped_after = BestEpoch(), None
    for epoch, score in enumerate([0.5, 0.7, 0.6, 0.4, 0.3, 0.2], start=1):
        best.update(epoch, score)
        if best.exhausted(patience=2):
            stopped_after = epoch
            break
    assert stopped_after == 4 and best.epoch == 2 and best.score == 0.7
    assert not BestEpoch(since=100).exhausted(patience=0)  # patience 0: never stop early
    tie = BestEpoch()
    assert tie.update(1, 0.5) and not tie.update(2, 0.5) and tie.epoch == 1  # a tie is not an improvement


def test_training_stops_early_patience_epochs_after_the_best_and_keeps_it(tiny_prepared, tmp_path):
    seen = []
    summary = train_tiny(
        tiny_prepared,
        tmp_path,
        dataclasses.replace(TINY_TRAIN, epochs=30, patience=1, lr=3e-3),
        on_epoch_end=lambda trainer, row: seen.append(row["val_dice"]),
    )
    best = int(np.argmax(seen)) + 1  # first epoch with the highest val_dice@0.5
    assert summary["epochs_run"] == len(seen) == best + 1 < 30  # stopped one epoch (patience) after the best
    assert summary["best_epoch"] == best and summary["val_dice_at_0.5"] == seen[best - 1]


def test_a_hook_returning_false_ends_training_and_the_run_finishes(tiny_prepared, tmp_path):
    summary = train_tiny(
        tiny_prepared,
        tmp_path,
        dataclasses.replace(TINY_TRAIN, epochs=5),
        on_epoch_end=lambda trainer, row: row["epoch"] < 2,
    )
    assert summary["epochs_run"] == 2 and (tmp_path / "model.pt").exists()
    assert list(pd.read_csv(tmp_path / "curves.tsv", sep="\t")["epoch"]) == [1, 2]


def test_learning_rate_schedule():
    p = TrainParams(epochs=10, lr=1e-3, schedule="cosine", warmup_epochs=1)
    assert lr_at(p, 0, 10) == pytest.approx(1e-4)  # warm-up: step 1 of 10
    assert lr_at(p, 9, 10) == pytest.approx(1e-3)
    assert lr_at(p, 10, 10) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(p, 100, 10) == pytest.approx(1e-5)  # and ends at 1% of it
    assert lr_at(TrainParams(lr=2e-4), 57, 10) == 2e-4  # the report's constant lr


def test_threshold_tuning_finds_the_gap():
    # Infected pixels get p = 0.72, healthy ones p = 0.58: every grid threshold in (0.58, 0.72]
    # (0.6 ... 0.7) is perfect; the tie-break picks the one nearest 0.5, 0.6.
    masks = np.zeros((3, 1, 8, 8), np.uint8)
    masks[:, :, 2:5, 2:5] = 1
    prob = np.where(masks[:, 0] > 0, 0.72, 0.58)
    logits = torch.from_numpy(np.log(prob / (1 - prob))).float()
    assert tune_threshold(logits, masks, 1.0) == pytest.approx(0.6)


def test_temperature_recovers_overconfident_logits():
    gen = np.random.default_rng(0)
    z = gen.normal(0, 2, (4, 1, 96, 96))
    masks = (gen.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.uint8)  # calibrated at T = 1 on z
    logits = torch.from_numpy(2.0 * z[:, 0]).float()  # twice overconfident
    assert 1.6 < tune_temperature(logits, masks) < 2.5
