"""covidseg.evaluation.evaluate on a tiny generated prepared dir and a tiny untrained model.

The prepared dir, the model and the run come from ``make_eval_prepared``, ``make_eval_model`` and
``run_evaluate`` in helpers.py (test_figures.py and test_report_browser.py use them too).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidseg.evaluation.evaluate import evaluate
from covidseg.evaluation.metrics import PR_BINS, baselines, class_breakdown
from covidseg.inference.forward import predict_logits, probabilities
from covidseg.model.checkpoint import load_model, save_model
from covidseg.model.unet import UNet, UNetConfig
from covidseg.params import EvaluateParams

from helpers import EVAL_TUNED_THRESHOLD, TINY_SIZE, make_eval_model, make_eval_prepared, run_evaluate


def _strict_json(path: Path) -> dict:
    def no_constant(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constant)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return run_evaluate(tmp_path_factory.mktemp("evaluate"))


def _reference_probs(tiny: dict) -> tuple[np.ndarray, np.ndarray]:
    """The model's test probabilities and truth, computed here independently of evaluate()."""
    model, _ = load_model(tiny["model"])
    with np.load(tiny["prepared"] / "test.npz") as z:
        images, truth = z["images"], z["masks"][:, 0].astype(bool)
    return probabilities(predict_logits(model, images, torch.device("cpu"), "fp32")), truth


def test_metrics_json_keys_and_standard_json(tiny):
    data = _strict_json(tiny["details"])
    for key in (
        "n_images",
        "rmse",
        "dice",
        "iou",
        "brier",
        "ece",
        "ece_bins",
        "at_fixed_threshold",
        "at_tuned_threshold",
        "baselines",
        "temperature",
        "flip_tta",
        "empty_truth_rule",
    ):
        assert key in data, key
    assert data["flip_tta"] is False  # the model file has no flip_tta
    assert data["n_images"] == 4
    assert data["at_fixed_threshold"]["threshold"] == 0.5
    assert data["at_tuned_threshold"]["threshold"] == EVAL_TUNED_THRESHOLD  # from the model file, not the params
    for block in (data["at_fixed_threshold"], data["at_tuned_threshold"]):
        for key in (
            "dice_mean",
            "dice_std",
            "iou_mean",
            "iou_std",
            "precision_mean",
            "recall_mean",
            "hd95_mean",
            "hd95_median",
            "dice_global",
            "iou_global",
            "precision_global",
            "recall_global",
            "images_scored",
            "empty_truth_images",
            "empty_truth_false_positive_images",
            "hd95_undefined_images",
        ):
            assert key in block, key
        assert block["empty_truth_images"] == 1
    assert set(data["baselines"]) == {"all_background", "constant_prior", "lung_mask"}
    assert "NaN" in data["empty_truth_rule"] and "false positive" in data["empty_truth_rule"]


def test_headline_metrics_are_few_flat_numbers_taken_from_the_details(tiny):
    """metrics/test.json (what DVC compares) holds only flat numbers, each equal to its detailed source."""
    head, details = _strict_json(tiny["metrics"]), _strict_json(tiny["details"])
    # numbers, or null where undefined (NaN is written as null)
    assert all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in head.values()), head
    assert len(head) <= 30
    for key in ("n_images", "rmse", "dice", "iou", "ece"):
        assert head[key] == details[key], key
    tuned, fixed = details["at_tuned_threshold"], details["at_fixed_threshold"]
    assert head["threshold"] == tuned["threshold"] == EVAL_TUNED_THRESHOLD
    assert head["dice_at_threshold"] == tuned["dice_mean"]
    assert head["dice_global"] == fixed["dice_global"] and head["hd95_median"] == fixed["hd95_median"]
    assert head["covid19_dice"] == details["by_class"]["COVID-19"]["dice"]
    assert head["covid19_rmse"] == details["by_class"]["COVID-19"]["rmse"]


def test_metrics_match_an_independent_computation(tiny):
    prob, truth = _reference_probs(tiny)
    s = tiny["summary"]
    assert s["rmse"] == pytest.approx(math.sqrt(np.mean((prob.astype(np.float64) - truth) ** 2)), rel=1e-6)
    assert s["brier"] == pytest.approx(s["rmse"] ** 2, rel=1e-9)
    dices = []
    for p, t in zip(prob >= 0.5, truth):
        tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
        if tp + fp + fn:
            dices.append(2 * tp / (2 * tp + fp + fn))
    assert s["dice"] == pytest.approx(np.mean(dices))
    assert s["at_fixed_threshold"]["images_scored"] == len(dices)
    # the constant-prior baseline uses the train split's infected share: 4 lesions of 6x6 in 4 images of 32x32
    assert s["baselines"]["constant_prior"]["prior"] == pytest.approx(36 / 1024)
    # all background: error 1 on every infected test pixel (3 lesions of 36), 0 elsewhere
    assert s["baselines"]["all_background"]["rmse"] == pytest.approx(math.sqrt(3 * 36 / (4 * 1024)))


def test_by_class_matches_an_independent_computation(tiny):
    prob, truth = _reference_probs(tiny)
    by_class = tiny["summary"]["by_class"]
    assert _strict_json(tiny["details"])["by_class"].keys() == by_class.keys() == {"COVID-19", "Non-COVID"}
    covid, negative = slice(0, 3), slice(3, 4)  # make_eval_prepared: 3 COVID-19 test images, then 1 Non-COVID
    assert by_class["COVID-19"]["n_images"] == 3 and by_class["Non-COVID"]["n_images"] == 1
    assert by_class["COVID-19"]["rmse"] == pytest.approx(
        math.sqrt(np.mean((prob[covid].astype(np.float64) - truth[covid]) ** 2)), rel=1e-5
    )
    assert by_class["Non-COVID"]["rmse"] == pytest.approx(
        math.sqrt(np.mean(prob[negative].astype(np.float64) ** 2)), rel=1e-5
    )
    dices = [
        2 * (p & t).sum() / ((p & t).sum() * 2 + (p & ~t).sum() + (~p & t).sum())
        for p, t in zip(prob[covid] >= 0.5, truth[covid])
    ]
    assert by_class["COVID-19"]["dice"] == pytest.approx(np.mean(dices), rel=1e-5)
    assert by_class["COVID-19"]["empty_truth_images"] == 0
    assert by_class["Non-COVID"]["empty_truth_images"] == 1
    assert by_class["Non-COVID"]["empty_truth_false_positive_images"] == int((prob[3] >= EVAL_TUNED_THRESHOLD).any())


def test_class_breakdown_by_hand():
    nan = float("nan")
    per = pd.DataFrame(
        {
            "class": ["COVID-19", "COVID-19", "Normal", "Normal"],
            "rmse": [0.3, 0.4, 0.0, 0.2],
            "true_fraction": [0.1, 0.2, 0.0, 0.0],
            "pred_fraction": [0.1, 0.3, 0.0, 0.05],
            "dice_fixed": [0.5, 0.7, nan, 0.0],
            "iou_fixed": [0.4, 0.6, nan, 0.0],
            "dice_tuned": [0.6, 0.8, nan, 0.0],
            "iou_tuned": [0.5, 0.7, nan, 0.0],
        }
    )
    out = class_breakdown(per)
    assert list(out) == ["COVID-19", "Normal"]
    covid, normal = out["COVID-19"], out["Normal"]
    assert covid["rmse"] == pytest.approx(math.sqrt((0.09 + 0.16) / 2))  # pooled over pixels, not the mean of RMSEs
    assert covid["dice"] == pytest.approx(0.6) and covid["dice_at_tuned_threshold"] == pytest.approx(0.7)
    assert covid["iou"] == pytest.approx(0.5) and covid["iou_at_tuned_threshold"] == pytest.approx(0.6)
    assert (covid["empty_truth_images"], covid["empty_truth_false_positive_images"]) == (0, 0)
    assert normal["rmse"] == pytest.approx(math.sqrt(0.04 / 2))
    assert normal["dice"] == 0.0  # only the false positive is scored; the clean negative is left out (NaN)
    assert (normal["empty_truth_images"], normal["empty_truth_false_positive_images"]) == (2, 1)
    clean = class_breakdown(per.iloc[[2]])["Normal"]  # nothing scored at all
    assert math.isnan(clean["dice"]) and clean["empty_truth_false_positive_images"] == 0


def test_per_image_csv_rows(tiny):
    per = pd.read_csv(tiny["per_image"])
    assert per["id"].tolist() == ["covid_1", "covid_2", "covid_3", "Non_COVID (1)"]
    assert per["class"].tolist() == ["COVID-19"] * 3 + ["Non-COVID"]
    for col in (
        "true_fraction",
        "pred_fraction",
        "rmse",
        "dice_fixed",
        "iou_fixed",
        "precision_fixed",
        "recall_fixed",
        "hd95_fixed",
        "dice_tuned",
        "iou_tuned",
        "precision_tuned",
        "recall_tuned",
        "hd95_tuned",
    ):
        assert col in per.columns, col
    assert per["true_fraction"].tolist()[:3] == pytest.approx([36 / 1024] * 3, rel=1e-5)  # CSV keeps 6 digits
    assert per["true_fraction"].iloc[3] == 0
    # the empty-truth image: recall undefined; Dice 0 if anything was predicted there, else undefined
    neg = per.iloc[3]
    assert math.isnan(neg["recall_fixed"])
    assert (
        (neg["dice_fixed"] == 0)
        if tiny["summary"]["at_fixed_threshold"]["empty_truth_false_positive_images"]
        else math.isnan(neg["dice_fixed"])
    )


def test_curve_csvs(tiny):
    pr = pd.read_csv(tiny["eval"] / "pr.csv")
    assert list(pr.columns) == ["threshold", "precision", "recall"] and len(pr) == PR_BINS
    assert pr["recall"].iloc[0] == 1.0  # threshold 0 predicts every pixel
    assert pr["recall"].is_monotonic_decreasing
    cal = pd.read_csv(tiny["eval"] / "calibration.csv")
    assert list(cal.columns) == ["bin_lo", "bin_hi", "mean_probability", "fraction_infected", "pixels"]
    assert cal["pixels"].sum() == 4 * TINY_SIZE * TINY_SIZE and (cal["pixels"] > 0).all()
    assert ((cal["mean_probability"] >= cal["bin_lo"]) & (cal["mean_probability"] <= cal["bin_hi"])).all()


def test_predictions_file(tiny):
    prob, _ = _reference_probs(tiny)
    with np.load(tiny["predictions"]) as z:
        assert z["probs"].dtype == np.uint8 and z["probs"].shape == (4, TINY_SIZE, TINY_SIZE)
        assert float(z["threshold"]) == EVAL_TUNED_THRESHOLD
        assert np.abs(z["probs"] / 255.0 - prob).max() <= 0.5 / 255 + 1e-6


def test_flip_averaging_as_saved_in_the_model(tmp_path):
    """A model calibrated with flip averaging is evaluated with it (and test.json says so)."""
    prepared = make_eval_prepared(tmp_path / "prepared")
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=2))
    with torch.no_grad():
        net.head.weight.mul_(100)  # strong logits, so the mirrored prediction differs visibly
    model = tmp_path / "model.pt"
    save_model(model, net, {"threshold": EVAL_TUNED_THRESHOLD, "temperature": 1.0, "size": TINY_SIZE, "flip_tta": True})
    summary = evaluate(
        model,
        prepared,
        tmp_path / "test.json",
        tmp_path / "per_image.csv",
        tmp_path / "eval",
        tmp_path / "pred.npz",
        EvaluateParams(precision="fp32"),  # the reference below is fp32
    )
    net, _ = load_model(model)
    with np.load(prepared / "test.npz") as z:
        images, truth = z["images"], z["masks"][:, 0].astype(bool)
    plain, tta = (
        probabilities(predict_logits(net, images, torch.device("cpu"), "fp32", flip_tta=f)) for f in (False, True)
    )
    assert summary["flip_tta"] is True
    assert summary["rmse"] == pytest.approx(math.sqrt(np.mean((tta.astype(np.float64) - truth) ** 2)), rel=1e-6)
    with np.load(tmp_path / "pred.npz") as z:
        saved = z["probs"] / 255.0
    assert np.abs(saved - tta).max() <= 0.5 / 255 + 1e-6
    assert np.abs(saved - plain).max() > 2 / 255


def test_baselines_by_hand():
    truth = np.zeros((1, 2, 4), bool)
    truth[0, 0, 0] = True  # 1 infected pixel of 8
    lungs = np.zeros((1, 2, 4), bool)
    lungs[0, :, :2] = True  # 4 lung pixels, containing the infected one
    b = baselines(truth, lungs, prior=0.25)
    # all background: squared errors 1 once -> Brier 1/8
    assert b["all_background"]["brier"] == pytest.approx(1 / 8)
    assert b["all_background"]["dice_mean"] == 0.0
    # prior 0.25: (0.75^2 + 7 * 0.25^2) / 8 = (0.5625 + 0.4375) / 8 = 1/8; predicts nothing at 0.5 -> Dice 0
    assert b["constant_prior"]["brier"] == pytest.approx(1 / 8)
    # lung: p = 0.5 on 4 pixels -> 4 * 0.25 / 8 = 1/8; mask = lungs: TP 1, FP 3 -> Dice 2 / (2 + 3) = 0.4
    assert b["lung_mask"]["brier"] == pytest.approx(1 / 8)
    assert b["lung_mask"]["dice_mean"] == pytest.approx(0.4)
    assert b["lung_mask"]["rmse"] == pytest.approx(math.sqrt(1 / 8))


def test_empty_test_split_is_a_clear_error(tmp_path):
    prepared = make_eval_prepared(tmp_path / "prepared", n_test_covid=0, n_test_negative=0)
    model = make_eval_model(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"test\.npz: the test split is empty"):
        evaluate(
            model, prepared, tmp_path / "m.json", tmp_path / "p.csv", tmp_path, tmp_path / "p.npz", EvaluateParams()
        )
    assert not (tmp_path / "m.json").exists()


def test_missing_model_names_the_file(tmp_path):
    prepared = make_eval_prepared(tmp_path / "prepared")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        evaluate(
            tmp_path / "nowhere.pt",
            prepared,
            tmp_path / "m.json",
            tmp_path / "p.csv",
            tmp_path,
            tmp_path / "p.npz",
            EvaluateParams(),
        )


def test_severity_block_from_a_model_with_a_lung_head(tmp_path):
    """With a lung head: lungs predicted and saved, severity scored against the truth, headline numbers set."""
    from covidseg.evaluation.severity_eval import HEADLINE, lung_dice
    from covidseg.inference.calibration import Calibration, calibrated_outputs
    from covidseg.masks.severity import LUNG_THRESHOLD, severity_table

    prepared = make_eval_prepared(tmp_path / "prepared")
    torch.manual_seed(0)
    model_path = tmp_path / "model.pt"
    save_model(
        model_path,
        UNet(UNetConfig(base_channels=4, depth=2, out_channels=2)),
        {"threshold": EVAL_TUNED_THRESHOLD, "temperature": 1.0, "size": TINY_SIZE},
    )
    metrics_path = tmp_path / "metrics" / "test.json"
    s = evaluate(
        model_path,
        prepared,
        metrics_path,
        tmp_path / "eval" / "per_image.csv",
        tmp_path / "eval",
        tmp_path / "pred.npz",
        EvaluateParams(bootstrap_resamples=200),
    )
    head = _strict_json(metrics_path)
    model = s["severity"]["model"]
    assert set(HEADLINE) <= set(head) and all(head[k] == model[k] for k in HEADLINE if model[k] == model[k])
    # independent: the same lungs and infection, scored here
    net, _ = load_model(model_path)
    with np.load(prepared / "test.npz") as z:
        images, masks, lungs = z["images"], z["masks"][:, 0].astype(bool), z["lungs"][:, 0].astype(bool)
    inf, lung = calibrated_outputs(
        net, images, torch.device("cpu"), "fp32", Calibration(threshold=EVAL_TUNED_THRESHOLD)
    )
    assert model["lung_dice"] == pytest.approx(lung_dice(lung >= LUNG_THRESHOLD, lungs))
    with np.load(tmp_path / "pred.npz") as z:
        assert z["lungs"].shape == z["probs"].shape and np.array_equal(
            z["lungs"], np.round(lung * 255).astype(np.uint8)
        )
    per = pd.read_csv(tmp_path / "eval" / "severity.csv")
    truth = severity_table(masks, lungs)
    assert np.allclose(per["true_right_pct"], truth["right_pct"], equal_nan=True)
    assert {"pred_right_pct", "pred_left_pct", "pred_extent_score", "oracle_extent_score"} <= set(per.columns)
    assert s["severity"]["oracle_true_lungs"]["lungs"] == 2 * len(images)
    assert s["severity"]["baseline_constant_share"]["share_pct"] >= 0
    assert (inf >= 0).all()


def test_severity_without_a_lung_head_is_null_with_a_reason(tiny):
    head = _strict_json(tiny["metrics"])
    assert head["share_mae"] is None and head["extent_kappa"] is None  # null, never a silent zero
    assert "no lung head" in tiny["summary"]["severity"]["model"]["error"]


def test_headline_intervals_bracket_the_point_values(tiny):
    head, details = _strict_json(tiny["metrics"]), _strict_json(tiny["details"])
    assert details["intervals"]["resamples"] == EvaluateParams().bootstrap_resamples
    assert head["rmse_ci95_low"] <= head["rmse"] <= head["rmse_ci95_high"]
    assert head["rmse_ci95_low"] < head["rmse_ci95_high"]  # 4 images with different errors
    for key in ("dice", "iou"):  # the tiny untrained model scores 0 on every image: the interval is the point
        assert head[f"{key}_ci95_low"] <= head[key] <= head[f"{key}_ci95_high"]


def test_rmse_interval_by_hand(tmp_path):
    """Two images, per-image MSE 0 and 1: resampled pooled RMSE is sqrt(0), sqrt(1/2) or sqrt(1)."""
    from covidseg.evaluation.evaluate import _intervals

    prob = np.stack([np.zeros((2, 2)), np.ones((2, 2))]).astype(np.float32)
    truth = np.zeros((2, 2, 2), bool)
    per = pd.DataFrame({"dice": [np.nan, 0.0], "iou": [np.nan, 0.0]})
    out = _intervals(prob, truth, per, n_resamples=2000)
    assert (out["rmse_ci95_low"], out["rmse_ci95_high"]) == (0.0, 1.0)  # each end has probability 1/4 > 2.5 %
    assert (out["dice_ci95_low"], out["dice_ci95_high"]) == (0.0, 0.0)  # the NaN image is dropped, as in the mean


def _evaluate_into(out: Path, model: Path, prepared: Path, params: EvaluateParams) -> dict:
    return evaluate(model, prepared, out / "test.json", out / "per_image.csv", out / "eval", out / "pred.npz", params)


def test_one_model_file_scores_the_same_whether_the_cpu_has_native_bf16_or_not(tmp_path, monkeypatch):
    """The default evaluate.precision (fp32) makes a model's test metrics independent of the CPU kind."""
    prepared = make_eval_prepared(tmp_path / "prepared")
    model = make_eval_model(tmp_path / "model.pt")
    for forced in ("0", "1"):
        monkeypatch.setenv("COVIDSEG_NATIVE_BF16", forced)
        summary = _evaluate_into(tmp_path / f"native{forced}", model, prepared, EvaluateParams())
        assert summary["evaluate_precision"] == "fp32"
    for name in ("test.json", "test_details.json", "per_image.csv", "eval/pr.csv", "eval/calibration.csv"):
        assert (tmp_path / "native0" / name).read_bytes() == (tmp_path / "native1" / name).read_bytes(), name


@pytest.mark.parametrize("forced, expected", [("0", "fp32"), ("1", "bf16")])
def test_auto_and_the_precisions_used_are_recorded(tmp_path, monkeypatch, forced, expected):
    """evaluate.precision=auto follows the capability (forced here); details record both resolved precisions."""
    monkeypatch.setenv("COVIDSEG_NATIVE_BF16", forced)
    prepared = make_eval_prepared(tmp_path / "prepared")
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_model(
        model,
        UNet(UNetConfig(base_channels=4, depth=2)),
        {"threshold": EVAL_TUNED_THRESHOLD, "temperature": 1.0, "size": TINY_SIZE, "train_precision": "bf16"},
    )
    _evaluate_into(tmp_path / "out", model, prepared, EvaluateParams(precision="auto"))
    details = _strict_json(tmp_path / "out" / "test_details.json")
    assert details["evaluate_precision"] == expected and details["train_precision"] == "bf16"


def test_bf16_evaluation_differs_from_fp32_and_says_so(tmp_path):
    """Forced bf16 runs the bf16 branch on any CPU (tiny model): other probabilities, labelled bf16."""
    prepared = make_eval_prepared(tmp_path / "prepared")
    model = make_eval_model(tmp_path / "model.pt")
    fp32 = _evaluate_into(tmp_path / "fp32", model, prepared, EvaluateParams(precision="fp32"))
    bf16 = _evaluate_into(tmp_path / "bf16", model, prepared, EvaluateParams(precision="bf16"))
    assert (fp32["evaluate_precision"], bf16["evaluate_precision"]) == ("fp32", "bf16")
    assert fp32["train_precision"] == bf16["train_precision"] == "unknown"  # make_eval_model records none
    assert bf16["rmse"] != fp32["rmse"] and bf16["rmse"] == pytest.approx(fp32["rmse"], abs=0.01)
