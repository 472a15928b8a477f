"""Severity against the truth, on masks small enough to work out by hand."""

import math

import numpy as np
import pytest

from covidseg.evaluation.severity_eval import (
    HEADLINE,
    constant_share_table,
    evaluate_severity,
    lung_dice,
    median_lung_share,
    score_against_truth,
)
from covidseg.masks.severity import severity_table

H, W = 8, 12  # image-left lung: columns 1-4 (patient's right), image-right lung: columns 7-10


def lungs(n: int = 1) -> np.ndarray:
    m = np.zeros((n, H, W), bool)
    m[:, 1:7, 1:5] = True
    m[:, 1:7, 7:11] = True
    return m  # 24 pixels per lung


def infect(masks: np.ndarray, image: int, cols: slice, rows: slice = slice(1, 7)) -> None:
    masks[image, rows, cols] = True


def test_identical_prediction_agrees_perfectly():
    truth = np.zeros((3, H, W), bool)
    infect(truth, 0, slice(1, 3))  # right lung 12/24 = 50 %
    infect(truth, 1, slice(1, 5))  # right 100 %
    infect(truth, 1, slice(7, 8), slice(1, 2))  # left 1/24 = 4.17 %
    t = severity_table(truth, lungs(3))
    s = score_against_truth(t, t, n_resamples=200)
    assert s["share_mae"] == 0 and s["share_mae_ci95_low"] == 0 and s["share_mae_ci95_high"] == 0
    assert s["extent_exact"] == 1 and s["extent_within1"] == 1 and s["extent_kappa"] == pytest.approx(1.0)
    assert s["share_pearson"] == pytest.approx(1.0) and s["share_bias"] == 0 and s["lungs_missed"] == 0
    assert s["lungs"] == 6


def test_share_error_and_extent_by_hand():
    truth, pred = np.zeros((2, H, W), bool), np.zeros((2, H, W), bool)
    infect(truth, 0, slice(1, 3))  # image 0: right 50 % (extent 3), left 0 % (0) -> score 3
    infect(pred, 0, slice(1, 2))  # predicted right 25 % (extent 2), left 0 -> score 2
    infect(truth, 1, slice(7, 11))  # image 1: left 100 % (4) -> score 4
    infect(pred, 1, slice(7, 11))  # exact
    s = score_against_truth(severity_table(pred, lungs(2)), severity_table(truth, lungs(2)), n_resamples=200)
    # per-image mean abs error: image 0 (25 + 0) / 2 = 12.5, image 1 0 -> mean 6.25 points
    assert s["share_mae"] == pytest.approx(6.25)
    assert s["extent_exact"] == 0.5 and s["extent_within1"] == 1.0
    assert s["share_bias"] == pytest.approx(-25 / 4)  # differences -25, 0, 0, 0
    assert s["extent_confusion"][3][2] == 1 and s["extent_confusion"][4][4] == 1  # rows true, columns predicted
    assert 0 <= s["share_mae_ci95_low"] <= 6.25 <= s["share_mae_ci95_high"] <= 12.5
    # two images, one exact: resampled exact-agreement shares are 0, 0.5 or 1
    assert (s["extent_exact_ci95_low"], s["extent_exact_ci95_high"]) == (0.0, 1.0)
    assert s["extent_within1_ci95_low"] == s["extent_within1_ci95_high"] == 1.0


def test_a_lung_the_model_misses_scores_zero_and_is_counted():
    truth = np.zeros((1, H, W), bool)
    infect(truth, 0, slice(7, 11))  # left lung 100 % infected
    pred_lungs = lungs(1)
    pred_lungs[0, :, 6:] = False  # the model finds only the image-left (patient's right) lung
    head, details, per = evaluate_severity(
        truth.copy(), pred_lungs, truth, lungs(1), baseline_share=10.0, n_resamples=100
    )
    model = details["model"]
    assert model["lungs_missed"] == 1
    assert head["share_mae"] == pytest.approx((0 + 100) / 2)  # right 0 vs 0, left 0 (missed) vs 100
    assert model["infected_outside_lungs_pct_mean"] == pytest.approx(100.0)  # all predicted infection is outside
    assert head["lung_dice"] == pytest.approx(2 * 24 / (24 + 48))
    assert details["oracle_true_lungs"]["share_mae"] == 0  # true lungs: the error is the lung mask's
    assert list(per.columns[:2]) == ["true_right_pct", "true_left_pct"]


def test_constant_baseline_and_train_median():
    t = constant_share_table(30.0, 3)
    assert (t["right_extent"] == 2).all() and (t["extent_score"] == 4).all()
    train = np.zeros((2, H, W), bool)
    infect(train, 0, slice(1, 2))  # right 25 %, left 0 %
    infect(train, 1, slice(7, 10))  # left 75 %, right 0 %
    assert median_lung_share(train, lungs(2)) == pytest.approx(12.5)  # median of 25, 0, 0, 75


def test_a_model_without_a_lung_head_gets_no_silent_zero():
    truth = np.zeros((1, H, W), bool)
    infect(truth, 0, slice(1, 3))
    head, details, _ = evaluate_severity(truth, None, truth, lungs(1), baseline_share=0.0, n_resamples=50)
    assert set(head) == set(HEADLINE) and all(math.isnan(v) for v in head.values())
    assert "no lung head" in details["model"]["error"] and "lung_aux_weight" in details["model"]["error"]
    assert details["oracle_true_lungs"]["share_mae"] == 0


def test_lung_dice_by_hand():
    a, b = lungs(1), lungs(1)
    b[0, :, 7:] = False
    assert lung_dice(a, b) == pytest.approx(2 * 24 / 72)
