"""Resume safety, byte-identical outputs, metrics vs run log, provenance and log labels of training."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import covidseg.training.calibration as calibration_mod
import covidseg.training.loop as train_mod
from covidseg.model.checkpoint import load_model
from covidseg.training.calibration import TEMPERATURES
from covidseg.training.codehash import code_hash
from covidseg.training.loop import CURVE_FIELDS
from covidseg.training.run import train

from helpers import TINY_TRAIN, capture_logs, interrupt_after, log_lines, train_tiny

TWO = dataclasses.replace(TINY_TRAIN, epochs=2)


def _cut_after_epoch_1(tiny_prepared, out, params=TWO):
    """Train and interrupt once epoch 1 is saved, leaving a resume state after epoch 1."""
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_prepared, out, params, on_epoch_end=interrupt_after(1))
    assert (out / "resume" / "state.pt").exists()


def _rerun(tiny_prepared, out, caplog, params=TWO):
    capture_logs(caplog).clear()
    train(
        tiny_prepared,
        out / "model.pt",
        out / "resume",
        out / "curves.tsv",
        out / "train.json",
        params,
        0,
    )
    return [line for line in log_lines(caplog) if line.startswith("resume:")]


def test_resume_state_from_other_training_code_starts_afresh(tiny_prepared, tmp_path, monkeypatch, caplog):
    _cut_after_epoch_1(tiny_prepared, tmp_path)
    monkeypatch.setattr(train_mod, "code_hash", lambda: "edited-loss")  # as after an edit to losses.py
    lines = _rerun(tiny_prepared, tmp_path, caplog)
    assert len(lines) == 1 and "training code changed" in lines[0] and "starting afresh" in lines[0]
    assert list(pd.read_csv(tmp_path / "curves.tsv", sep="\t")["epoch"]) == [1, 2]


def test_code_hash_covers_the_modules_train_imports(tmp_path):
    src = Path(train_mod.__file__).resolve().parents[2]
    shutil.copytree(src, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    root = tmp_path / "src"
    entry = root / "covidseg" / "training" / "loop.py"
    before = code_hash(entry, root)
    assert (
        len(before) == 64
        and before == code_hash(src / "covidseg" / "training" / "loop.py", src) == train_mod.code_hash()
    )

    def hash_with_one_byte_changed(relative):
        path = root / relative
        original = path.read_bytes()
        path.write_bytes(original + b" ")
        try:
            return code_hash(entry, root)
        finally:
            path.write_bytes(original)

    for covered in (
        "covidseg/model/unet.py",
        "covidseg/model/losses.py",
        "covidseg/inference/calibration.py",
        "covidseg/training/loop.py",
    ):
        assert hash_with_one_byte_changed(covered) != before, covered
    assert hash_with_one_byte_changed("covidseg/evaluation/figures.py") == before  # train does not import it
    assert code_hash(entry, root) == before


def test_resume_state_from_another_world_size_starts_afresh(tiny_prepared, tmp_path, caplog):
    _cut_after_epoch_1(tiny_prepared, tmp_path)
    path = tmp_path / "resume" / "state.pt"
    state = torch.load(path, weights_only=False)
    state["world_size"] = 2
    torch.save(state, path)
    lines = _rerun(tiny_prepared, tmp_path, caplog)
    assert len(lines) == 1 and "2 process(es), this run has 1" in lines[0] and "starting afresh" in lines[0]


@pytest.mark.parametrize("content", [b"garbage, not a torch file", "list", "wrong-model"])
def test_unreadable_or_unfitting_resume_state_starts_afresh_without_crashing(tiny_prepared, tmp_path, content, caplog):
    _cut_after_epoch_1(tiny_prepared, tmp_path)
    path = tmp_path / "resume" / "state.pt"
    if content == "list":
        torch.save([1, 2, 3], path)
    elif content == "wrong-model":  # a state_dict of another network with the same fingerprint
        state = torch.load(path, weights_only=False)
        state["model"] = {k: v[..., :1] if v.ndim else v for k, v in state["model"].items()}
        torch.save(state, path)
    else:
        path.write_bytes(content)
    lines = _rerun(tiny_prepared, tmp_path, caplog)
    assert len(lines) == 1 and "starting afresh" in lines[0]
    assert list(pd.read_csv(tmp_path / "curves.tsv", sep="\t")["epoch"]) == [1, 2]


def test_same_params_and_seed_give_byte_identical_outputs(tiny_prepared, tmp_path):
    for name in ("a", "b"):
        train_tiny(tiny_prepared, tmp_path / name, TWO)
    for f in ("model.pt", "train.json", "curves.tsv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_metrics_hold_headline_numbers_and_the_run_log_holds_timings(tiny_prepared, tmp_path):
    summary = train_tiny(tiny_prepared, tmp_path, dataclasses.replace(TWO, max_train_images=5))
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert {
        "epochs_run",
        "best_epoch",
        "val_dice_at_0.5",
        "val_dice_at_threshold",
        "val_rmse",
        "threshold",
        "temperature",
        "temperature_at_grid_edge",
        "train_images",
    } <= set(metrics)
    assert not {"train_seconds", "train_images_per_second", "device", "precision", "world_size"} & set(metrics)
    assert metrics["train_images"] == 5
    run_log = json.loads((tmp_path / "train_log.json").read_text())
    assert {"train_seconds", "train_images_per_second", "epoch_seconds", "device", "precision", "world_size"} <= set(
        run_log
    )
    assert len(run_log["epoch_seconds"]) == 2 and run_log["world_size"] == 1
    assert summary == metrics | run_log
    assert (
        pd.read_csv(tmp_path / "curves.tsv", sep="\t").columns.tolist() == CURVE_FIELDS
        and "seconds" not in CURVE_FIELDS
    )


def test_model_file_records_provenance(tiny_prepared, tmp_path):
    summary = train_tiny(tiny_prepared, tmp_path, dataclasses.replace(TWO, max_train_images=5))
    _, meta = load_model(tmp_path / "model.pt")
    prov = meta["provenance"]
    assert prov["data_source"] == "raw" and prov["synthetic"] is False  # tiny_prepared's source folder is named raw
    assert prov["split_counts"] == {"train": 9, "val": 5, "test": 5} and prov["train_images"] == 5
    assert prov["val_dice"] == pytest.approx(summary["val_dice_at_threshold"])
    assert prov["package_version"] and prov["code_hash"] == train_mod.code_hash()
    assert str(tmp_path) not in json.dumps(meta, default=str)


def test_logs_label_the_selection_dice_and_report_the_images_used(tiny_prepared, tmp_path, caplog):
    capture_logs(caplog)
    train_tiny(tiny_prepared, tmp_path, dataclasses.replace(TWO, max_train_images=5))
    logs = log_lines(caplog)
    assert any("using 5 of 9 training images (train.max_train_images)" in line for line in logs)
    epochs = [line for line in logs if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("val_dice@0.5 " in line for line in epochs)
    assert any(line.startswith("model: epoch") and "val_dice@0.5" in line for line in logs)


def test_temperature_at_the_grid_edge_warns_and_is_recorded(tiny_prepared, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(calibration_mod, "tune_temperature", lambda logits, masks: float(TEMPERATURES[-1]))
    capture_logs(caplog)
    summary = train(
        tiny_prepared,
        tmp_path / "model.pt",
        tmp_path / "resume",
        tmp_path / "curves.tsv",
        tmp_path / "train.json",
        dataclasses.replace(TINY_TRAIN, epochs=1, temperature_scaling=True),
        0,
    )
    assert summary["temperature_at_grid_edge"] is True and summary["temperature"] == 10.0
    assert json.loads((tmp_path / "train.json").read_text())["temperature_at_grid_edge"] is True
    warnings = log_lines(caplog, logging.WARNING)
    assert any(line.startswith("the tuned temperature 10 is at the edge of its grid") for line in warnings)
