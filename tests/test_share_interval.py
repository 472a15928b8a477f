"""The per-lung share interval (normalised split conformal on val) and the review flags, checked by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from covidseg.evaluation.evaluate import score
from covidseg.evaluation.severity_intervals import interval_summary, lung_share_error
from covidseg.inference.predict import CSV_COLUMNS, write_outputs
from covidseg.masks.share_interval import (
    MIN_LUNGS,
    UNSURE_LUNG_SHARE,
    WIDE_GRADES,
    ShareInterval,
    film_intervals,
    fit_share_interval,
    grades_spanned,
    lung_spreads,
    review_reasons,
    unsure_lung_share,
)
from covidseg.params import EvaluateParams


def test_the_quantile_is_the_conformal_rank_of_the_normalised_errors():
    n = 39  # rank ceil(40 * 0.95) = 38 of 39
    pred = np.full(n, 20.0)
    errors = np.arange(1, n + 1, dtype=float)  # |true - pred| = 1 .. 39
    true = pred + np.where(np.arange(n) % 2 == 0, errors, -errors).clip(-20, None)
    spread = np.zeros(n)
    fitted = fit_share_interval(pred, true, spread, offset=5.0)
    scores = np.sort(np.abs(true - pred) / 5.0)
    assert fitted.q == pytest.approx(scores[math.ceil((n + 1) * 0.95) - 1]) and fitted.lungs == n
    low, high = fitted.bounds(np.array([10.0, 90.0]), np.array([0.0, 5.0]))
    assert low.tolist() == [max(0.0, 10 - fitted.q * 5), max(0.0, 90 - fitted.q * 10)]
    assert high.tolist() == [min(100.0, 10 + fitted.q * 5), 100.0]


def test_lungs_missing_from_either_side_are_left_out_and_too_few_give_none():
    pred = np.full((MIN_LUNGS, 2), 10.0)
    true = pred.copy()
    true[0, 0] = np.nan
    assert fit_share_interval(pred, true, np.zeros_like(pred)).lungs == 2 * MIN_LUNGS - 1
    assert fit_share_interval(pred[:15], true[:15], np.zeros((15, 2))) is None  # 29 lungs with both


def test_meta_round_trip_and_refusals():
    interval = ShareInterval(q=1.8, lungs=400)
    assert ShareInterval.from_meta(interval.to_meta()) == interval
    assert ShareInterval.from_meta(None) is None
    for bad in (
        {"q": -1, "lungs": 3, "level": 0.95, "offset": 5},
        {"q": 1.0},
        {"q": 1, "lungs": 3, "level": 2, "offset": 5},
    ):
        with pytest.raises(ValueError, match="share_interval"):
            ShareInterval.from_meta(bad)


def test_spread_is_the_share_moved_between_the_two_thresholds():
    prob = np.zeros((10, 20), np.float32)
    right, left = np.zeros((10, 20), bool), np.zeros((10, 20), bool)
    right[:, :10], left[:, 10:] = True, True
    prob[:, :2] = 0.9  # 20 of the right lung's 100 pixels sure
    prob[:, 2:5] = 0.5  # 30 more between the thresholds
    assert lung_spreads(prob, right, left) == (pytest.approx(30.0), 0.0)
    assert math.isnan(lung_spreads(prob, right, np.zeros_like(left))[1])


def test_grades_and_review_reasons():
    assert grades_spanned(0.0, 30.0) == 2 and grades_spanned(10.0, 20.0) == 0 and grades_spanned(None, 5.0) == 0
    assert review_reasons("ok", 0.0, (0, WIDE_GRADES - 1), UNSURE_LUNG_SHARE) == []
    assert review_reasons("ok", 60.0, (WIDE_GRADES, 0), UNSURE_LUNG_SHARE + 0.01) == [
        "interval_spans_grades",
        "outside_lungs",
        "unsure_lung_head",
    ]
    assert review_reasons("lung_area+outside", 60.0, (0, 0), 0.0) == ["lung_area", "outside"]
    lung = np.zeros((10, 10))
    lung[:, :5] = 0.9
    lung[:, 5:6] = 0.6  # 10 of the 60 lung pixels unsure
    assert unsure_lung_share(lung) == pytest.approx(10 / 60)


def _film():
    """Two 40 x 30 lungs on a 64 x 100 film; the right one half infected (p 0.9), its edge unsure (p 0.5)."""
    lung_prob = np.zeros((64, 100), np.float32)
    lung_prob[12:52, 10:40] = lung_prob[12:52, 60:90] = 0.95
    prob = np.zeros((64, 100), np.float32)
    prob[12:32, 10:40] = 0.9
    prob[32:36, 10:40] = 0.5
    return prob, lung_prob


def test_a_film_gets_its_interval_and_a_refused_film_none():
    prob, lung_prob = _film()
    interval = ShareInterval(q=2.0, lungs=100)
    got = film_intervals(prob, lung_prob, 0.6, interval, status="ok")
    assert got["right_pct"] == pytest.approx(50.0) and got["left_pct"] == 0.0
    half = 2.0 * (10.0 + 5.0)  # spread: 4 more rows of 40 infected at 0.25 than at 0.75
    assert (got["right_pct_low"], got["right_pct_high"]) == (pytest.approx(50 - half), pytest.approx(50 + half))
    assert (got["left_pct_low"], got["left_pct_high"]) == (0.0, pytest.approx(10.0))
    assert got["review"] == ""  # 20-80 % spans grades 1 to 4: three steps, not all four
    wide = film_intervals(prob, lung_prob, 0.6, ShareInterval(q=4.0, lungs=100), status="ok")
    assert (wide["right_pct_low"], wide["right_pct_high"]) == (0.0, 100.0) and wide["review"] == "interval_spans_grades"
    refused = film_intervals(prob, lung_prob, 0.6, interval, status="lateral")
    assert math.isnan(refused["right_pct_low"]) and refused["review"] == "lateral"
    without = film_intervals(prob, lung_prob, 0.6, None, status="ok")
    assert math.isnan(without["right_pct_high"]) and without["review"] == ""


def test_the_summary_counts_coverage_and_the_error_of_flagged_films():
    per = pd.DataFrame(
        {
            "true_right_pct": [10.0, 50.0, np.nan],
            "true_left_pct": [20.0, 5.0, 30.0],
            "pred_right_pct": [12.0, 20.0, 40.0],
            "pred_left_pct": [18.0, 5.0, 35.0],
            "pred_right_pct_low": [0.0, 10.0, 20.0],
            "pred_right_pct_high": [30.0, 30.0, 60.0],
            "pred_left_pct_low": [10.0, 0.0, np.nan],
            "pred_left_pct_high": [30.0, 20.0, np.nan],
            "review": ["", "interval_spans_grades", ""],
        }
    )
    summary = interval_summary(per, ShareInterval(q=1.0, lungs=50))
    assert summary["lungs_scored"] == 4 and summary["coverage"] == pytest.approx(3 / 4)  # 50 lies outside 10-30
    assert summary["mean_width"] == pytest.approx((30 + 20 + 20 + 20) / 4)
    assert summary["flagged_films"] == 1 and summary["share_mae_flagged"] == pytest.approx(15.0)
    assert summary["share_mae_others"] == pytest.approx((2.0 + 5.0) / 2)
    assert summary["review_reasons"] == {"interval_spans_grades": 1}


def test_a_film_without_any_scored_lung_has_no_error_and_raises_no_warning():
    """No lung found (predicted shares NaN) beside a normal film: the summary leaves it out, silently."""
    per = pd.DataFrame(
        {
            "true_right_pct": [10.0, 40.0],
            "true_left_pct": [20.0, 30.0],
            "pred_right_pct": [14.0, np.nan],
            "pred_left_pct": [18.0, np.nan],
            "pred_right_pct_low": [0.0, np.nan],
            "pred_right_pct_high": [30.0, np.nan],
            "pred_left_pct_low": [10.0, np.nan],
            "pred_left_pct_high": [30.0, np.nan],
            "review": ["", "unsure_lung_head"],
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would fail here
        summary = interval_summary(per, ShareInterval(q=1.0, lungs=50))
    assert summary["lungs_scored"] == 2 and summary["share_mae_others"] == pytest.approx((4.0 + 2.0) / 2)
    assert summary["flagged_films"] == 1 and summary["share_mae_flagged"] is None


def test_lung_share_error_by_hand_leaves_out_undefined_lungs():
    pred = np.array([[30.0, 10.0], [np.nan, 50.0], [0.0, 100.0], [np.nan, np.nan]])
    true = np.array([[10.0, 20.0], [40.0, 45.0], [0.0, 100.0], [5.0, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = lung_share_error(pred, true)
    # (20 + 10) / 2; the left lung only; an empty and an all-infected lung hit exactly; no lung
    assert error[:3] == pytest.approx([15.0, 5.0, 0.0]) and np.isnan(error[3])


def _chest_grey() -> np.ndarray:
    """uint8 (64, 100) grey levels of :func:`_film`: dark lung fields beside a bright spine, as on an X-ray."""
    grey = np.full((64, 100), 120, np.uint8)
    grey[12:52, 10:40] = grey[12:52, 60:90] = 50
    grey[:, 46:54] = 220
    return grey


def test_predict_writes_each_lungs_interval_and_the_review_column(tmp_path):
    prob, lung_prob = _film()
    interval = ShareInterval(q=2.0, lungs=100)
    got = write_outputs(tmp_path, "film", _chest_grey(), prob, 0.6, False, lung_prob=lung_prob, share_interval=interval)
    assert got["severity_status"] == "ok" and got["right_lung_infected_pct"] == pytest.approx(50.0)
    assert (got["right_lung_infected_pct_low"], got["right_lung_infected_pct_high"]) == (
        pytest.approx(20.0),
        pytest.approx(80.0),
    )
    assert got["left_lung_infected_pct_low"] == 0.0 and got["review"] == ""
    assert set(got) - {"severity_warning"} <= set(CSV_COLUMNS)  # the warning goes into the warning column
    plain = write_outputs(tmp_path, "film", _chest_grey(), prob, 0.6, False, lung_prob=lung_prob)
    assert plain["right_lung_infected_pct_low"] is None and plain["review"] == ""  # the model records no interval


def test_the_evaluate_stage_scores_the_coverage_of_the_models_intervals(tmp_path):
    prob, lung_prob = _film()
    truth = np.zeros((2, 64, 100), np.uint8)
    truth[0, 12:30, 10:40] = 1  # right lung 45 % infected: inside [20, 80]
    truth[1, 12:52, 10:40] = 1  # 100 %: outside
    lungs = (np.stack([lung_prob, lung_prob]) >= 0.5).astype(np.uint8)
    test = {
        "images": np.stack([_chest_grey(), _chest_grey()])[:, None],
        "masks": truth[:, None],
        "lungs": lungs[:, None],
        "ids": np.array(["a", "b"]),
        "classes": np.array(["COVID-19", "COVID-19"]),
    }
    run = {
        "threshold": 0.6,
        "temperature": 1.0,
        "flip_tta": False,
        "lung_gate": False,
        "evaluate_precision": "fp32",
        "train_precision": "fp32",
        "share_interval": ShareInterval(q=2.0, lungs=100).to_meta(),
    }
    outputs = (tmp_path / "m.json", tmp_path / "per.csv", tmp_path / "curves", tmp_path / "p.npz", tmp_path / "d.json")
    probs, lung_probs = np.stack([prob, prob]), np.stack([lung_prob, lung_prob])
    summary = score(probs, lung_probs, test, (truth.astype(bool), lungs.astype(bool)), run, outputs, EvaluateParams())
    block = summary["severity"]["model"]["share_interval"]
    # Four true lungs: right 45 (in), right 100 (out), left 0 twice (in [0, 10]).
    assert block["lungs_scored"] == 4 and block["coverage"] == pytest.approx(3 / 4)
    per = pd.read_csv(tmp_path / "curves" / "severity.csv")
    assert per["pred_right_pct_low"].tolist() == pytest.approx([20.0, 20.0]) and "review" in per.columns
    bands = {b["band"]: b for b in summary["severity"]["model"]["share_error_by_true_band"]}
    assert bands["0-25"]["lungs"] == 2 and bands["75-100"]["lungs"] == 1 and bands["75-100"]["mae"] == pytest.approx(50)
