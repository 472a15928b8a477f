"""Predict trusts nothing it loads or shares: every metadata value of a model file is checked on load (one line
naming the file, the key and the value, exit 2), and one output folder takes one run at a time."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import onnx
import pytest
import torch

from covidseg.export.graph import export_onnx
from covidseg.inference.calibration import Calibration
from covidseg.inference.model_meta import ModelMetadataError, checked_meta
from covidseg.inference.predict import LOCK_NAME, read_csv
from covidseg.model.unet import UNet, UNetConfig

from helpers import FAST_PREDICT_FLAGS, TINY_SIZE, invoke_predict, make_predict_model, save_image


def _edit_pt(path, **changes):
    payload = torch.load(path, weights_only=False)
    payload.update(changes)
    torch.save(payload, path)
    return path


def _onnx_model(tmp_path):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=2, out_channels=2)).eval()
    return export_onnx(net, tmp_path / "m.onnx", TINY_SIZE, {}, calibration=Calibration(threshold=0.5))


def _edit_onnx(path, key, value):
    model = onnx.load(str(path))
    props = {prop.key: prop for prop in model.metadata_props}
    if key not in props:  # a key the exporter writes only for some models (covidseg.share_interval)
        props[key] = model.metadata_props.add()
        props[key].key = key
    props[key].value = value
    onnx.save(model, str(path))
    return path


def _predict(tmp_path, model):
    save_image(tmp_path / "in" / "film.png", "grey", 40, 30)
    return invoke_predict(tmp_path / "in", "--model", model, "--out", tmp_path / "out", *FAST_PREDICT_FLAGS)


def _refused(result, model, key, value_repr):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: {model}: metadata {key} = {value_repr} ")


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("threshold", float("nan"), "nan"),
        ("threshold", 2.0, "2.0"),
        ("threshold", 0.0, "0.0"),
        ("threshold", "0.5", "'0.5'"),
        ("temperature", float("nan"), "nan"),
        ("temperature", -1.0, "-1.0"),
        ("temperature", 0.0, "0.0"),
        ("flip_tta", "no", "'no'"),
        ("lung_gate", 1, "1"),
        ("size", 0, "0"),
        ("size", 33, "33"),  # not a multiple of the tiny U-Net's stride 2
        ("size", True, "True"),
        ("contrast", "sharpen", "'sharpen'"),
    ],
)
def test_a_bad_torch_metadata_value_is_one_line_and_exit_2(tmp_path, key, value, shown):
    model = _edit_pt(make_predict_model(tmp_path / "m.pt"), **{key: value})
    result = _predict(tmp_path, model)
    _refused(result, model, key, shown)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("covidseg.size", "0", "0"),
        ("covidseg.size", "128", "128"),  # the graph's input is 32 x 32
        ("covidseg.size", "abc", "'abc'"),
        ("covidseg.threshold", "nan", "'nan'"),
        ("covidseg.threshold", "NaN", "nan"),
        ("covidseg.threshold", "2", "2"),
        ("covidseg.temperature", "-1", "-1"),
        ("covidseg.flip_tta", '"no"', "'no'"),
        (
            "covidseg.share_interval",
            '{"q": -1, "lungs": 40, "level": 0.95, "offset": 5}',
            "{'q': -1, 'lungs': 40, 'level': 0.95, 'offset': 5}",
        ),
        ("covidseg.share_interval", "[1, 2]", "[1, 2]"),
    ],
)
def test_a_bad_onnx_metadata_value_is_one_line_and_exit_2(tmp_path, key, value, shown):
    model = _edit_onnx(_onnx_model(tmp_path), key, value)
    result = _predict(tmp_path, model)
    _refused(result, model, key, shown)


def test_the_checks_accept_what_training_writes_and_fill_the_defaults(tmp_path):
    ok = checked_meta(tmp_path / "m.pt", {"size": 256, "threshold": 0.475, "temperature": 1.5849}, stride=32)
    assert ok == {
        "size": 256,
        "threshold": 0.475,
        "temperature": 1.5849,
        "lung_gate": False,
        "flip_tta": False,
        "contrast": "none",
        "share_interval": None,
    }
    assert checked_meta(tmp_path / "m.pt", {"size": 64})["threshold"] is None
    with pytest.raises(ModelMetadataError, match="has no 'size'"):
        checked_meta(tmp_path / "m.pt", {})
    with pytest.raises(ModelMetadataError, match="differs from the ONNX graph's input side 256"):
        checked_meta(tmp_path / "m.onnx", {"size": 128}, graph_size=256)
    assert math.isclose(checked_meta(tmp_path / "m.onnx", {"size": 64}, graph_size="S")["temperature"], 1.0)


def test_a_folder_in_use_by_a_live_run_is_refused_naming_its_pid(tmp_path):
    model = make_predict_model(tmp_path / "m.pt")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()} 2026-12-01T00:00:00+0000")
        save_image(tmp_path / "in" / "film.png", "grey", 40, 30)
        result = invoke_predict(tmp_path / "in", "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
        assert result.exit_code == 2 and f"another covidseg predict (pid {holder.pid}" in result.output
        assert not (out / "predictions.csv").exists() and not (out / "masks").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; the run removes its own lock when done
    result = invoke_predict(tmp_path / "in", "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    assert not (out / LOCK_NAME).exists() and len(read_csv(out / "predictions.csv")) == 1


def test_the_table_describes_every_image_the_folder_holds(tmp_path):
    model = make_predict_model(tmp_path / "m.pt")
    out = tmp_path / "out"
    for name in ("a", "b"):
        save_image(tmp_path / name / f"{name}.png", "grey", 40, 30)
        assert invoke_predict(tmp_path / name, "--model", model, "--out", out, *FAST_PREDICT_FLAGS).exit_code == 0
    assert sorted(r["stem"] for r in read_csv(out / "predictions.csv")) == ["a", "b"]
    os.remove(out / "masks" / "a.png")  # a user deletes one image's outputs
    save_image(tmp_path / "c" / "b.png", "grey", 50, 30)  # and a new b.png replaces the old one
    assert invoke_predict(tmp_path / "c", "--model", model, "--out", out, *FAST_PREDICT_FLAGS).exit_code == 0
    rows = read_csv(out / "predictions.csv")
    assert [(r["stem"], r["width"]) for r in rows] == [("b", "50")]
