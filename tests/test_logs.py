"""covidseg's logging: the library logs, entry points choose the verbosity (-v / -q, COVIDSEG_LOG), rank 0 only."""

from __future__ import annotations

import dataclasses
import io
import logging

import pytest
from typer.testing import CliRunner

import covidseg.training.calibration as calibration_mod
from covidseg import logs
from covidseg.cli import app
from covidseg.training.calibration import TEMPERATURES

from helpers import FAST_PREDICT_FLAGS, TINY_TRAIN, make_predict_model, save_image, train_tiny


@pytest.fixture(autouse=True)
def _restore_logging():
    """Each test configures the ``covidseg`` logger afresh; leave it as the other tests expect (no handler)."""
    yield
    root = logging.getLogger(logs.ROOT_LOGGER)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.NOTSET)


def _emit_all() -> None:
    log = logging.getLogger("covidseg.some.module")
    log.debug("the device")
    log.info("epoch 1/2")
    log.warning("the temperature is at the edge")
    log.error("the file is gone")


@pytest.mark.parametrize(
    ("verbosity", "expected"),
    [
        (logs.SILENT, ["error: the file is gone"]),
        (logs.QUIET, ["warning: the temperature is at the edge", "error: the file is gone"]),
        (logs.NORMAL, ["epoch 1/2", "warning: the temperature is at the edge", "error: the file is gone"]),
        (
            logs.VERBOSE,
            ["debug: the device", "epoch 1/2", "warning: the temperature is at the edge", "error: the file is gone"],
        ),
    ],
)
def test_each_verbosity_shows_its_levels_with_a_prefix_on_all_but_info(verbosity, expected):
    out = io.StringIO()
    logs.configure(verbosity, stream=out)
    _emit_all()
    assert out.getvalue().splitlines() == expected


def test_configuring_again_replaces_the_handler():
    first, second = io.StringIO(), io.StringIO()
    logs.configure(logs.NORMAL, stream=first)
    logs.configure(logs.NORMAL, stream=second)
    logging.getLogger("covidseg.x").info("once")
    assert first.getvalue() == "" and second.getvalue() == "once\n"


def test_flags_environment_and_rank_choose_the_verbosity():
    assert logs.verbosity_from_flags(0, False) == logs.NORMAL
    assert logs.verbosity_from_flags(3, False) == logs.VERBOSE
    assert logs.verbosity_from_flags(0, True) == logs.QUIET
    with pytest.raises(ValueError, match="contradict"):
        logs.verbosity_from_flags(1, True)
    assert logs.verbosity_from_env({}) == logs.NORMAL
    assert logs.verbosity_from_env({"COVIDSEG_LOG": " Quiet "}) == logs.QUIET
    with pytest.raises(ValueError, match=r"COVIDSEG_LOG='loud': must be one of quiet, normal, verbose"):
        logs.verbosity_from_env({"COVIDSEG_LOG": "loud"})
    assert logs.stage_verbosity({"COVIDSEG_LOG": "verbose"}) == logs.VERBOSE
    assert logs.stage_verbosity({"COVIDSEG_LOG": "verbose", "RANK": "1"}) == logs.SILENT
    with pytest.raises(ValueError, match="verbosity must be one of"):
        logs.configure(5)


def test_quiet_training_logs_its_warning_but_no_progress(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration_mod, "tune_temperature", lambda logits, masks: float(TEMPERATURES[-1]))
    out = io.StringIO()
    logs.configure(logs.QUIET, stream=out)
    train_tiny(tiny_prepared, tmp_path, dataclasses.replace(TINY_TRAIN, epochs=1, temperature_scaling=True))
    lines = out.getvalue().splitlines()
    # one warning per calibration candidate (with and without lung gating), and nothing else
    assert lines and all(
        line.startswith("warning: the tuned temperature 10 is at the edge of its grid") for line in lines
    )


def test_verbose_training_adds_the_resolved_device_and_precision(tiny_prepared, tmp_path):
    out = io.StringIO()
    logs.configure(logs.VERBOSE, stream=out)
    train_tiny(tiny_prepared, tmp_path, dataclasses.replace(TINY_TRAIN, epochs=1))
    text = out.getvalue()
    assert "debug: train: device cpu, precision fp32 (train.precision fp32)" in text
    assert "epoch 1/1 " in text


def test_cli_verbose_and_quiet(tmp_path):
    model = make_predict_model(tmp_path / "model.pt")
    save_image(tmp_path / "in" / "a.png", "grey", 40, 30)
    runner = CliRunner()
    args = ["predict", str(tmp_path / "in"), "--model", str(model), *FAST_PREDICT_FLAGS]

    loud = runner.invoke(app, ["-v", *args, "--out", str(tmp_path / "v")])
    assert loud.exit_code == 0, loud.output
    assert "debug: predict: 1 inputs; model" in loud.stderr and "predict: 1 of 1 images done" in loud.stdout

    quiet = runner.invoke(app, ["-q", *args, "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0, quiet.output
    assert "debug:" not in quiet.stderr and "images done" not in quiet.stdout
    assert (tmp_path / "q" / "masks" / "a.png").is_file()

    both = runner.invoke(app, ["-v", "-q", *args, "--out", str(tmp_path / "b")])
    assert both.exit_code == 2 and "contradict each other" in both.output
    assert not (tmp_path / "b").exists()
