"""`covidseg evaluate MODEL SOURCE --out DIR`: external validation with every test metric and its interval, from a
torch file, an ONNX file or another tool's masks, checked against numbers computed here by hand."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.evaluation.external import ExternalEvaluationError, evaluate_external
from covidseg.export.graph import export_onnx
from covidseg.inference.calibration import Calibration
from covidseg.model.checkpoint import load_model

from helpers import KAGGLE_NEST, make_kaggle_dataset, make_predict_model

runner = CliRunner()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    make_kaggle_dataset(tmp_path / "kaggle", per_split=12)
    return tmp_path / "kaggle"


def _test_masks(source: Path) -> dict[str, np.ndarray]:
    folder = source / KAGGLE_NEST / "Test" / "COVID-19" / "infection masks"
    return {p.stem: np.asarray(Image.open(p)) > 127 for p in sorted(folder.glob("*.png"))}


def test_a_torch_model_on_a_kaggle_source_writes_every_output_and_prints_the_intervals(tmp_path, source):
    model = make_predict_model(tmp_path / "model.pt", seed=1)
    result = runner.invoke(app, ["evaluate", str(model), str(source), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "ev"
    for name in (
        "metrics.json",
        "details.json",
        "per_image.csv",
        "predictions.npz",
        "curves/pr.csv",
        "figures/prediction_overlay.png",
        "figures/pr_curve.png",
        "figures/gallery.png",
    ):
        assert (out / name).is_file(), name
    details = json.loads((out / "details.json").read_text())
    assert details["n_images"] == 12 and details["split"] == "test" and details["baseline_source"] == "train split"
    assert "dice_ci95_low" in details["intervals"] and "Dice" in result.stdout and "[" in result.stdout
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(_test_masks(source))


def test_the_onnx_file_scores_what_the_torch_file_scores(tmp_path, source):
    pt = make_predict_model(tmp_path / "model.pt", seed=2)
    net, meta = load_model(pt)
    onnx_file = export_onnx(
        net, tmp_path / "model.onnx", int(meta["size"]), {}, calibration=Calibration.from_meta(meta)
    )
    a = evaluate_external(pt, source, tmp_path / "a")
    b = evaluate_external(onnx_file, source, tmp_path / "b")
    for key in ("rmse", "dice", "iou"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_another_tools_masks_are_scored_against_numbers_computed_by_hand(tmp_path, source):
    truth = _test_masks(source)
    masks = tmp_path / "nnunet_pred"
    masks.mkdir()
    expected = []
    for k, (stem, t) in enumerate(truth.items()):
        pred = t.copy()
        if k % 2:  # every other film: keep the top half of the lesion only
            rows = np.flatnonzero(t.any(axis=1))
            pred[rows[len(rows) // 2] :] = False
        Image.fromarray(pred.astype(np.uint8)).save(masks / f"{stem}.png")  # nnU-Net writes 0/1
        tp, fp, fn = (pred & t).sum(), (pred & ~t).sum(), (~pred & t).sum()
        expected.append(2 * tp / (2 * tp + fp + fn))
    summary = evaluate_external(masks, source, tmp_path / "ev")
    assert summary["dice"] == pytest.approx(np.mean(expected), abs=1e-9)
    errors = [
        np.sqrt(((truth[s].astype(float) - (np.asarray(Image.open(masks / f"{s}.png")) > 0)) ** 2).mean())
        for s in truth
    ]
    pooled = np.sqrt(np.mean([e**2 for e in errors]))  # pooled over equal-sized films
    assert summary["rmse"] == pytest.approx(pooled, abs=1e-6)
    (masks / f"{next(iter(truth))}.png").unlink()
    with pytest.raises(ExternalEvaluationError, match="no predicted mask for film"):
        evaluate_external(masks, source, tmp_path / "ev2")


def test_an_external_test_set_without_train_or_val_folders(tmp_path, source):
    external = tmp_path / "external"
    shutil.copytree(source / KAGGLE_NEST / "Test", external / KAGGLE_NEST / "Test")
    model = make_predict_model(tmp_path / "model.pt", seed=3)
    summary = evaluate_external(model, external, tmp_path / "ev")
    assert summary["n_images"] == 12 and summary["baseline_source"].startswith("the scored films themselves")


def test_two_models_on_one_external_set_compare_paired(tmp_path, source):
    for seed, name in ((4, "a"), (5, "b")):
        model = make_predict_model(tmp_path / f"{name}.pt", seed=seed)
        assert runner.invoke(app, ["evaluate", str(model), str(source), "-o", str(tmp_path / name)]).exit_code == 0
    result = runner.invoke(
        app,
        ["compare", str(tmp_path / "a" / "per_image.csv"), str(tmp_path / "b" / "per_image.csv"), "--metric", "rmse"],
    )
    assert result.exit_code == 0, result.output
    assert "rmse over 12 images" in result.stdout


def test_bad_arguments_are_refused_by_name(tmp_path, source):
    result = runner.invoke(app, ["evaluate", str(tmp_path / "none.pt"), str(source), "-o", str(tmp_path / "ev")])
    assert result.exit_code == 2 and "none.pt" in result.output
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "junk.pt"), str(source), "-o", str(tmp_path / "ev")])
    assert result.exit_code == 2 and "junk.pt" in result.output
