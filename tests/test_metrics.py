"""Hand-checked unit tests of covidseg.evaluation.metrics and the PR curve of covidseg.evaluation.evaluate.

Every expected value is worked out by hand in the comment beside it, on arrays small enough
to count pixels on your fingers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from covidseg.evaluation import metrics
from covidseg.evaluation.metrics import calibration_table, pr_curve, threshold_metrics


def masks(*rows: str) -> np.ndarray:
    """A bool (H, W) mask from strings: '#' is infected, '.' is not."""
    return np.array([[ch == "#" for ch in row] for row in rows], dtype=bool)


# ---------------------------------------------------------------- confusion, Dice, IoU, precision, recall


def test_overlap_counts_and_ratios_by_hand():
    truth = masks("##..", "##..")
    pred = masks("#...", "#.#.")
    # TP: (0,0),(1,0) = 2; FP: (1,2) = 1; FN: (0,1),(1,1) = 2; TN: 8 - 5 = 3
    c = metrics.confusion(pred, truth)
    assert (c.tp.tolist(), c.fp.tolist(), c.fn.tolist(), c.tn.tolist()) == ([2], [1], [2], [3])
    # Dice = 2*2 / (2*2 + 1 + 2) = 4/7; IoU = 2 / (2 + 1 + 2) = 2/5
    assert metrics.dice(c)[0] == pytest.approx(4 / 7)
    assert metrics.iou(c)[0] == pytest.approx(2 / 5)
    # precision = 2 / (2 + 1) = 2/3; recall = 2 / (2 + 2) = 1/2
    assert metrics.precision(c)[0] == pytest.approx(2 / 3)
    assert metrics.recall(c)[0] == pytest.approx(1 / 2)
    # Dice and IoU are tied: IoU = Dice / (2 - Dice) = (4/7) / (10/7) = 2/5
    assert metrics.iou(c)[0] == pytest.approx(metrics.dice(c)[0] / (2 - metrics.dice(c)[0]))


def test_empty_truth_rule():
    empty = np.zeros((2, 3), bool)
    one = masks("#..", "...")
    full = np.ones((2, 3), bool)
    pred = np.stack([empty, one, empty, full])
    truth = np.stack([empty, empty, one, full])
    c = metrics.confusion(pred, truth)
    d, j, p, r = metrics.dice(c), metrics.iou(c), metrics.precision(c), metrics.recall(c)
    # image 0, both empty: 0/0 for every ratio -> NaN (undefined, dropped from means)
    assert all(math.isnan(v[0]) for v in (d, j, p, r))
    # image 1, false positive on empty truth: Dice = 0/(0+1+0) = 0, IoU = 0, precision = 0/1 = 0;
    # recall = 0/0 (no infected pixel to find) -> NaN
    assert (d[1], j[1], p[1]) == (0.0, 0.0, 0.0) and math.isnan(r[1])
    # image 2, empty prediction on non-empty truth: Dice = 0/(0+0+1) = 0, recall = 0/1 = 0;
    # precision = 0/0 (nothing predicted) -> NaN
    assert (d[2], j[2], r[2]) == (0.0, 0.0, 0.0) and math.isnan(p[2])
    # image 3, all-ones truth and prediction: TP = 6, FP = FN = 0 -> every ratio 1
    assert (d[3], j[3], p[3], r[3]) == (1.0, 1.0, 1.0, 1.0)
    # the override replaces only the undefined case
    assert metrics.dice(c, empty_score=1.0).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_global_counts_differ_from_per_image_mean():
    # image A: truth 4 px, prediction exact -> Dice 1. image B: truth 1 px, prediction 1 other px -> Dice 0.
    a_t = masks("##", "##")
    b_t = masks("#.", "..")
    b_p = masks(".#", "..")
    c = metrics.confusion(np.stack([a_t, b_p]), np.stack([a_t, b_t]))
    assert np.nanmean(metrics.dice(c)) == pytest.approx(0.5)  # (1 + 0) / 2
    # summed: TP 4, FP 1, FN 1 -> global Dice = 8 / (8 + 1 + 1) = 0.8, IoU = 4 / 6
    g = c.total()
    assert metrics.dice(g)[0] == pytest.approx(0.8)
    assert metrics.iou(g)[0] == pytest.approx(4 / 6)


def test_confusion_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"differ in shape"):
        metrics.confusion(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


# ---------------------------------------------------------------- RMSE and Brier


def test_rmse_and_brier_by_hand():
    prob = np.array([[[0.0, 0.5], [1.0, 0.25]]], np.float32)
    truth = np.array([[[0, 1], [1, 0]]], bool)
    # squared errors: 0, 0.25, 0, 0.0625 -> sum 0.3125, mean over 4 pixels 0.078125
    assert metrics.squared_error_sum(prob, truth) == pytest.approx(0.3125)
    assert metrics.brier(prob, truth) == pytest.approx(0.078125)
    assert metrics.rmse(prob, truth) == pytest.approx(math.sqrt(0.078125))  # 0.2795...


def test_rmse_pools_pixels_over_images_and_chunks():
    # 3 images of 1 pixel: errors 1, 0, 0 -> RMSE = sqrt(1/3), whatever the chunk size
    prob = np.array([1.0, 0.0, 1.0], np.float32).reshape(3, 1, 1)
    truth = np.array([0, 0, 1], bool).reshape(3, 1, 1)
    assert metrics.squared_error_sum(prob, truth, chunk=1) == pytest.approx(1.0)
    assert metrics.rmse(prob, truth) == pytest.approx(math.sqrt(1 / 3))


def test_trivial_rmse_baselines():
    # truth: 1 infected pixel in 4. All background: errors 1,0,0,0 -> RMSE 1/2.
    truth = masks("#.", "..")[None]
    assert metrics.rmse(np.zeros((1, 2, 2)), truth) == pytest.approx(0.5)
    # constant prior q = 1/4: errors (3/4)^2 once, (1/4)^2 three times -> (9 + 3)/16/4 = 3/16;
    # RMSE sqrt(3)/4 = 0.433 < 0.5: the prevalence minimises a constant's squared error (= q(1 - q)).
    assert metrics.brier(np.full((1, 2, 2), 0.25), truth) == pytest.approx(3 / 16)


def test_rmse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"prob .* and truth .* differ in shape"):
        metrics.rmse(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool))


# ---------------------------------------------------------------- HD95


def test_hd95_identical_masks_is_zero():
    m = np.zeros((7, 7), bool)
    m[2:5, 1:6] = True
    assert metrics.hd95(m, m) == 0.0


def test_hd95_single_pixels_at_known_distance():
    truth = np.zeros((5, 9), bool)
    pred = np.zeros((5, 9), bool)
    truth[2, 1] = True
    pred[2, 4] = True  # 3 columns away
    assert metrics.hd95(pred, truth) == pytest.approx(3.0)
    pred2 = np.zeros((5, 9), bool)
    pred2[4, 5] = True  # 2 rows and 4 columns away: sqrt(4 + 16) = sqrt(20)
    assert metrics.hd95(pred2, truth) == pytest.approx(math.sqrt(20))


def test_hd95_centre_pixel_inside_square():
    truth = np.zeros((9, 9), bool)
    truth[2:7, 2:7] = True  # 5x5 square; its surface is the 16-pixel ring (interior 3x3 erodes away)
    pred = np.zeros((9, 9), bool)
    pred[4, 4] = True  # the centre
    # pred -> truth: the centre's nearest ring pixel is 2 away -> P95 of [2] = 2.
    # truth -> pred: ring distances to the centre: 4 edge midpoints 2, 8 pixels sqrt(5), 4 corners sqrt(8).
    # Sorted 16 values, P95 index 0.95 * 15 = 14.25 lies between two corners -> sqrt(8).
    # HD95 = max(2, sqrt(8)) = 2 sqrt(2), symmetric in its arguments.
    assert metrics.hd95(pred, truth) == pytest.approx(math.sqrt(8))
    assert metrics.hd95(truth, pred) == pytest.approx(math.sqrt(8))


def test_hd95_is_max_of_directed_percentiles_not_pooled():
    truth = np.zeros((3, 12), bool)
    truth[1, 0] = True
    pred = np.zeros((3, 12), bool)
    pred[1, 0] = pred[1, 10] = True
    # pred -> truth: [0, 10], P95 = 0 + 0.95 * 10 = 9.5; truth -> pred: [0], P95 = 0. max -> 9.5
    # (pooling both directions, [0, 0, 10], would give 9.0: this pins MONAI's convention)
    assert metrics.hd95(pred, truth) == pytest.approx(9.5)


def test_hd95_empty_masks_are_undefined():
    empty = np.zeros((4, 4), bool)
    one = empty.copy()
    one[1, 1] = True
    assert math.isnan(metrics.hd95(empty, empty))
    assert math.isnan(metrics.hd95(one, empty))  # false positive on empty truth
    assert math.isnan(metrics.hd95(empty, one))  # nothing predicted


def test_hd95_all_ones_masks():
    full = np.ones((4, 4), bool)
    assert metrics.hd95(full, full) == 0.0
    # pred: the left half (columns 0, 1); truth: all 16 pixels. The image border counts as outside,
    # so truth's surface is the 12-pixel outer ring (rows 0 and 3, columns 0 and 3); every one of
    # pred's 8 pixels touches the border or column 2, so all 8 are surface.
    # pred -> truth: column 0 (4 px) and (0,1), (3,1) lie on the ring -> 0; (1,1), (2,1) -> 1.
    #   [0]*6 + [1]*2, P95 index 0.95 * 7 = 6.65 -> 1.
    # truth -> pred: column 0 (4) and (0,1), (3,1) -> 0; (0,2), (3,2) -> 1; column 3 (4) -> 2.
    #   [0]*6 + [1]*2 + [2]*4, P95 index 0.95 * 11 = 10.45 -> 2.   HD95 = max(1, 2) = 2.
    half = np.zeros((4, 4), bool)
    half[:, :2] = True
    assert metrics.hd95(half, full) == pytest.approx(2.0)


def test_hd95_takes_one_mask_at_a_time():
    with pytest.raises(ValueError, match="one mask"):
        metrics.hd95(np.ones((2, 3, 3), bool), np.ones((2, 3, 3), bool))


# ---------------------------------------------------------------- calibration


def test_calibration_bins_and_ece_by_hand():
    # 2 bins: [0, 0.5) and [0.5, 1]. p = 0.1, 0.3 (truth 0, 1); p = 0.6, 0.8, 1.0 (truth 1, 1, 0)
    prob = np.array([0.1, 0.3, 0.6, 0.8, 1.0])
    truth = np.array([0, 1, 1, 1, 0], bool)
    count, psum, tsum = metrics.calibration_bins(prob, truth, 2)
    assert count.tolist() == [2, 3]
    assert psum == pytest.approx([0.4, 2.4])
    assert tsum.tolist() == [1, 2]
    # bin 0: mean p 0.2, infected 1/2, gap 0.3, weight 2/5; bin 1: mean p 0.8, infected 2/3, gap 2/15, weight 3/5
    # ECE = 2/5 * 0.3 + 3/5 * 2/15 = 0.12 + 0.08 = 0.2
    assert metrics.expected_calibration_error(count, psum, tsum) == pytest.approx(0.2)
    table = calibration_table(count, psum, tsum)
    assert table["mean_probability"].tolist() == pytest.approx([0.2, 0.8])
    assert table["fraction_infected"].tolist() == pytest.approx([0.5, 2 / 3])
    assert table["pixels"].tolist() == [2, 3]


def test_ece_perfectly_calibrated_and_empty():
    # p = 0.5 on 4 pixels of which 2 are infected: mean p 0.5 = infected share 0.5 -> ECE 0
    count, psum, tsum = metrics.calibration_bins(np.full(4, 0.5), np.array([1, 0, 1, 0], bool), 10)
    assert metrics.expected_calibration_error(count, psum, tsum) == pytest.approx(0.0)
    assert math.isnan(metrics.expected_calibration_error(np.zeros(3), np.zeros(3), np.zeros(3)))


def test_calibration_table_leaves_out_empty_bins():
    count, psum, tsum = metrics.calibration_bins(np.array([0.05, 0.95]), np.array([0, 1], bool), 10)
    table = calibration_table(count, psum, tsum)
    assert table["bin_lo"].tolist() == pytest.approx([0.0, 0.9])
    assert table["bin_hi"].tolist() == pytest.approx([0.1, 1.0])


# ---------------------------------------------------------------- PR curve and per-threshold summaries


def test_pr_curve_by_hand():
    # 4 bins -> thresholds 0, 0.25, 0.5, 0.75. Positives p = 0.9, 0.6; negatives p = 0.3, 0.1.
    prob = np.array([0.9, 0.6, 0.3, 0.1])
    truth = np.array([1, 1, 0, 0], bool)
    pr = pr_curve(prob, truth, bins=4)
    assert pr["threshold"].tolist() == [0.0, 0.25, 0.5, 0.75]
    # t = 0: all 4 predicted -> precision 2/4, recall 2/2
    # t = 0.25: 0.9, 0.6, 0.3 -> precision 2/3, recall 1
    # t = 0.5: 0.9, 0.6 -> precision 1, recall 1
    # t = 0.75: 0.9 -> precision 1, recall 1/2
    assert pr["precision"].tolist() == pytest.approx([0.5, 2 / 3, 1.0, 1.0])
    assert pr["recall"].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5])


def test_pr_curve_threshold_is_inclusive_and_undefined_cases():
    # p exactly at a threshold counts as predicted there (p >= t), as in threshold_metrics
    pr = pr_curve(np.array([0.5, 0.2]), np.array([1, 0], bool), bins=4)
    assert pr["recall"].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    # nothing predicted at t = 0.75 -> precision undefined
    assert math.isnan(pr["precision"].iloc[3])
    # no infected pixel at all -> recall undefined everywhere
    assert pr_curve(np.array([0.4]), np.array([0], bool), bins=2)["recall"].isna().all()


def test_pr_curve_rows_match_global_precision_recall():
    rng = np.random.default_rng(0)
    prob = rng.random((3, 8, 8)).astype(np.float32)
    truth = rng.random((3, 8, 8)) < 0.3
    pr = pr_curve(prob, truth, bins=20)
    for t in (0.25, 0.5, 0.55):
        summary, _ = threshold_metrics(prob, truth, t)
        row = pr.loc[np.isclose(pr["threshold"], t)].iloc[0]
        assert row["precision"] == pytest.approx(summary["precision_global"])
        assert row["recall"] == pytest.approx(summary["recall_global"])


def test_threshold_metrics_summary_by_hand():
    truth = np.stack([masks("##", ".."), np.zeros((2, 2), bool), np.zeros((2, 2), bool)])
    prob = np.stack(
        [
            np.array([[0.9, 0.2], [0.6, 0.1]]),  # pred (0,0),(1,0): TP 1, FP 1, FN 1 -> Dice 1/2
            np.array([[0.7, 0.0], [0.0, 0.0]]),  # FP on empty truth -> Dice 0
            np.zeros((2, 2)),
        ]
    )  # both empty -> NaN, dropped
    s, per = threshold_metrics(prob, truth, 0.5)
    assert per["dice"].tolist()[:2] == pytest.approx([0.5, 0.0]) and math.isnan(per["dice"].iloc[2])
    assert s["dice_mean"] == pytest.approx(0.25)  # (1/2 + 0) / 2
    assert s["dice_std"] == pytest.approx(0.25)  # population std of [0.5, 0]
    assert s["images_scored"] == 2
    assert s["empty_truth_images"] == 2
    assert s["empty_truth_false_positive_images"] == 1
    # global: TP 1, FP 2, FN 1 -> Dice 2 / (2 + 2 + 1) = 0.4
    assert s["dice_global"] == pytest.approx(0.4)
    # HD95 image 0: pred {(0,0),(1,0)}, truth {(0,0),(0,1)}; pred->truth [0, 1], P95 0.95;
    # truth->pred [0, 1], P95 0.95 -> 0.95. Images 1 and 2 have an empty mask -> undefined.
    assert per["hd95"].iloc[0] == pytest.approx(0.95)
    assert s["hd95_undefined_images"] == 2
