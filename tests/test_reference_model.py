"""The reference model shipped in models/reference/: its files, its metadata, its card, the preset it was trained
with, and (with ../shared) what it predicts on real dev films."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from covidseg.inference import reference
from covidseg.inference.onnx_runtime import OnnxPredictor
from covidseg.inference.predict import PredictOptions, load_model_for_predict
from covidseg.masks.counts import confusion, dice
from covidseg.model.checkpoint import load_model

from conftest import REPO
from helpers import invoke_predict, save_image

REF = REPO / "models" / "reference"
RECORD = json.loads((REF / "reference.json").read_text(encoding="utf-8"))
MB = 1024 * 1024


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_files_are_shipped_within_their_size_limits_and_match_the_record():
    assert (REF / "model.onnx").stat().st_size <= 12 * MB
    assert (REF / "model.pt").stat().st_size <= 10 * MB
    assert set(RECORD["files"]) >= {"model.onnx", "model.pt"}
    for name, digest in RECORD["files"].items():
        assert _sha256(REF / name) == digest, f"models/reference/{name} is not the file reference.json records"
    assert reference.reference_model() == REF / "model.onnx"


def test_the_card_states_licence_use_provenance_and_numbers():
    card = (REF / "MODEL_CARD.md").read_text(encoding="utf-8")
    for phrase in ("CC BY-SA 4.0", "Research use only", "Not a medical device", "dev-Test", "Non-COVID", "Normal"):
        assert phrase in card, phrase
    assert RECORD["commit"] in card and RECORD["preset_sha256"] in card and RECORD["command"] in card
    assert RECORD["train_precision"] in card and RECORD["cpu"] in card
    assert f"{RECORD['test']['dice']:.3f} [{RECORD['test']['intervals']['dice_ci95_low']:.3f}" in card
    assert f"{RECORD['test_severity']['share_mae']:.1f} [" in card


def test_the_card_matches_the_preset_in_the_repository():
    """Retrain (`make real`, then tools/make_reference.py) whenever presets/real.yaml changes."""
    assert RECORD["preset"] == "presets/real.yaml"
    assert _sha256(REPO / RECORD["preset"]) == RECORD["preset_sha256"], (
        "presets/real.yaml changed since the reference model was trained: retrain it "
        "(make real DATA=...; .venv/bin/python tools/make_reference.py CHECKOUT DATA)"
    )


def test_metadata_of_both_files_agree_with_the_record():
    onnx = OnnxPredictor(REF / "model.onnx")
    assert onnx.size == RECORD["size"] and onnx.threshold == pytest.approx(RECORD["threshold"])
    calibration = onnx.calibration
    assert calibration["temperature"] == pytest.approx(RECORD["temperature"])
    assert calibration["flip_tta"] is RECORD["flip_tta"] and calibration["lung_gate"] is RECORD["lung_gate"]
    assert onnx.metadata["covidseg.train_precision"] == RECORD["train_precision"]
    _, meta = load_model(REF / "model.pt")
    assert meta["size"] == RECORD["size"] and meta["threshold"] == pytest.approx(RECORD["threshold"])
    assert meta["provenance"]["synthetic"] is False
    assert meta["provenance"]["split_counts"] == RECORD["split_counts"]
    loaded = load_model_for_predict(REF / "model.onnx", PredictOptions())
    assert loaded.backend == "onnx" and loaded.has_lung_head


def test_the_int8_file_is_shipped_because_it_ties_and_carries_the_same_calibration():
    int8 = RECORD["int8"]
    assert int8["file"] == reference.INT8_ONNX and int8["dice"]["tie"] and int8["share_error"]["tie"]
    assert abs(int8["dice"]["difference"]) <= int8["dice"]["margin"]
    a, b = OnnxPredictor(REF / "model.onnx"), OnnxPredictor(REF / reference.INT8_ONNX)
    assert b.size == a.size and b.calibration == a.calibration
    assert b.metadata["covidseg.quantization"].startswith("int8 QDQ")
    assert (REF / reference.INT8_ONNX).stat().st_size < (REF / "model.onnx").stat().st_size / 2
    card = (REF / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"{int8['dice']['difference']:+.4f} [" in card


def test_predict_without_a_model_uses_the_reference_and_says_so_once(tmp_path):
    save_image(tmp_path / "in" / "film.png", "grey", 300, 260)
    result = invoke_predict(tmp_path / "in", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    named = [line for line in result.stderr.splitlines() if "the reference model" in line]
    assert len(named) == 1 and str(REF / "model.onnx") in named[0]
    assert Image.open(tmp_path / "out" / "masks" / "film.png").size == (300, 260)


def test_a_reference_folder_named_by_the_environment_is_the_only_one_searched(tmp_path, monkeypatch):
    monkeypatch.setenv(reference.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"the reference model was not found \(looked in .*empty\)"):
        reference.reference_model()
    save_image(tmp_path / "film.png", "grey", 40, 30)
    result = invoke_predict(tmp_path / "film.png", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "COVIDSEG_REFERENCE_DIR" in result.output
    assert not (tmp_path / "out").exists()


def test_the_reference_segments_real_dev_films(dev_data, tmp_path):
    """Twelve real dev-Test COVID-19 films through `covidseg predict` with the default model: per-image Dice
    against their masks near the card's dev-Test number, and the lungs found on every film."""
    root = dev_data / "Infection Segmentation Data" / "Infection Segmentation Data" / "Test" / "COVID-19"
    films = sorted((root / "images").glob("*.png"))[:12]
    result = invoke_predict(*films, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = {r["stem"]: r for r in csv.DictReader(f)}
    scores = []
    for film in films:
        pred = np.asarray(Image.open(tmp_path / "out" / "masks" / film.name)) > 127
        truth = np.asarray(Image.open(root / "infection masks" / film.name)) > 127
        scores.append(float(dice(confusion(pred[None], truth[None]))[0]))
        assert rows[film.stem]["status"] == "ok" and rows[film.stem]["extent_score"] != ""
    # the card's dev-Test per-image Dice is 0.756 over 215 films (sd about 0.19); 12 films: mean well above 0.5
    assert np.mean(scores) > 0.55, scores
