"""Hand-checked tests of covidseg.evaluation.agreement; every expected number is worked out in the comment beside it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from covidseg.evaluation.agreement import (
    bland_altman,
    bootstrap_ci,
    confusion_matrix,
    extent_agreement,
    paired_bootstrap_diff,
    pearson,
    quadratic_weighted_kappa,
    share_mae,
    spearman,
)

# ---------------------------------------------------------------- bootstrap


def test_bootstrap_interval_contains_the_mean_and_is_reproducible():
    values = np.random.default_rng(1).normal(10, 2, size=50)
    low, high = bootstrap_ci(values, seed=3)
    assert low < values.mean() < high
    assert bootstrap_ci(values, seed=3) == (low, high)
    assert bootstrap_ci(values, seed=4) != (low, high)


def test_bootstrap_interval_narrows_with_more_images():
    rng = np.random.default_rng(2)
    few, many = rng.normal(0, 1, size=20), rng.normal(0, 1, size=2000)
    w_few = np.subtract(*bootstrap_ci(few)[::-1])
    w_many = np.subtract(*bootstrap_ci(many)[::-1])
    # The width of a mean's CI goes as 1/sqrt(n): 2000 images give ~10x narrower than 20.
    assert 5 < w_few / w_many < 20


def test_bootstrap_drops_nan_and_handles_degenerate_inputs():
    values = np.array([1.0, 2.0, 4.0, 8.0])
    with_nan = np.array([1.0, np.nan, 2.0, 4.0, np.nan, 8.0])
    assert bootstrap_ci(with_nan, seed=5) == bootstrap_ci(values, seed=5)
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan, np.nan]))
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    # A 0.5 level lies inside the 0.95 one.
    lo95, hi95 = bootstrap_ci(values)
    lo50, hi50 = bootstrap_ci(values, level=0.5)
    assert lo95 <= lo50 <= hi50 <= hi95
    # Another statistic: the median of resamples of {1, 2, 4, 8} can only be one of a few values.
    lo, hi = bootstrap_ci(values, statistic=np.median)
    assert 1 <= lo <= hi <= 8


@pytest.mark.parametrize("kwargs, match", [({"level": 1.0}, "level"), ({"n_resamples": 0}, "n_resamples")])
def test_bootstrap_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci([1.0, 2.0], **kwargs)


def test_paired_difference_detects_a_constant_shift_and_not_noise():
    b = np.random.default_rng(3).uniform(0, 100, size=40)
    shifted = paired_bootstrap_diff(b + 2.0, b)
    # Every per-image difference is exactly 2, so every resample's mean is 2.
    assert (
        shifted.diff == pytest.approx(2.0) and shifted.low == pytest.approx(2.0) and shifted.high == pytest.approx(2.0)
    )
    assert shifted.excludes_zero and shifted.n == 40
    noise = np.random.default_rng(4).normal(0, 1, size=40)
    same = paired_bootstrap_diff(b + noise - noise.mean(), b)  # mean difference exactly 0
    assert same.low < 0 < same.high and not same.excludes_zero
    # Pairing matters: the between-image spread (0..100) would swamp a shift of 2 if unpaired.
    assert shifted.high - shifted.low < 1e-9


def test_paired_difference_drops_pairs_with_a_nan_on_either_side():
    a = [1.0, np.nan, 5.0, 7.0]
    b = [0.0, 1.0, np.nan, 4.0]
    r = paired_bootstrap_diff(a, b)
    # Kept pairs: (1, 0) and (7, 4): differences 1 and 3, mean 2.
    assert r.n == 2 and r.diff == pytest.approx(2.0)
    assert 1 <= r.low <= r.high <= 3
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_diff([1.0], [1.0, 2.0])


# ---------------------------------------------------------------- continuous agreement


def test_share_mae_by_hand():
    # |10-8| + |12-12| + |9-10| = 3 over 3 pairs (the NaN pair dropped) = 1
    assert share_mae([10, 12, 9, np.nan], [8, 12, 10, 5]) == pytest.approx(1.0)
    assert math.isnan(share_mae([np.nan], [1.0]))


def test_pearson_by_hand_and_constant_input():
    # x = [1, 2, 3], y = [2, 4, 7]: dx = [-1, 0, 1], dy = [-7/3, -1/3, 8/3]
    # dx.dy = 7/3 + 8/3 = 5; |dx|^2 = 2; |dy|^2 = (49 + 1 + 64)/9 = 114/9; r = 5 / sqrt(2 * 114 / 9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(228 / 9))
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))
    assert math.isnan(pearson([1], [2]))


def test_pearson_does_not_depend_on_the_summation_order():
    # A committed metric's last digit must not change with the machine: BLAS dot products sum in a
    # CPU-dependent order, exactly rounded sums in none. Reordering the pairs is the same test on one machine.
    rng = np.random.default_rng(3)
    x = rng.normal(50, 20, 999)
    y = x + rng.normal(0, 15, 999)
    order = rng.permutation(999)
    assert pearson(x, y) == pearson(x[order], y[order])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_spearman_with_ties_by_hand():
    # x = [1, 2, 2, 3] ranks [1, 2.5, 2.5, 4] (the tie shares ranks 2 and 3); y = [1, 3, 2, 4] ranks [1, 3, 2, 4]
    # Both rank means are 2.5: dx = [-1.5, 0, 0, 1.5], dy = [-1.5, 0.5, -0.5, 1.5]
    # dx.dy = 2.25 + 2.25 = 4.5; |dx|^2 = 4.5; |dy|^2 = 5; rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    rho = spearman([1, 2, 2, 3], [1, 3, 2, 4])
    assert rho == pytest.approx(math.sqrt(0.9))
    assert rho == pytest.approx(stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]).statistic)
    assert math.isnan(spearman([4, 4, 4], [1, 2, 3]))
    assert spearman([1, 2, 3, np.nan], [10, 20, 30, 0]) == pytest.approx(1.0)


def test_bland_altman_by_hand():
    pred, true = [10, 12, 9, 15, np.nan], [8, 12, 10, 11, 3]
    ba = bland_altman(pred, true)
    # diffs (pred - true) = [2, 0, -1, 4], bias = 5/4 = 1.25
    # deviations 0.75, -1.25, -2.25, 2.75; squares sum 0.5625 + 1.5625 + 5.0625 + 7.5625 = 14.75
    # sd = sqrt(14.75 / 3) (ddof=1); limits 1.25 -+ 1.96 sd
    sd = math.sqrt(14.75 / 3)
    assert ba.n == 4 and ba.bias == pytest.approx(1.25) and ba.sd == pytest.approx(sd)
    assert ba.lower == pytest.approx(1.25 - 1.96 * sd) and ba.upper == pytest.approx(1.25 + 1.96 * sd)
    assert ba.diffs.tolist() == [2, 0, -1, 4] and ba.means.tolist() == [9, 12, 9.5, 13]


# ---------------------------------------------------------------- ordinal agreement


def test_confusion_matrix_rows_are_truth():
    m = confusion_matrix(pred=[0, 1, 1, 2], true=[0, 0, 1, 2], k=3)
    assert m.shape == (4, 4) and m.dtype == np.int64
    assert m.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="above k=2"):
        confusion_matrix([0, 3], [0, 1], k=2)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix([0.5], [0], k=2)


def test_quadratic_kappa_three_categories_by_hand():
    true = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 2, 2, 2]
    # O (rows true, cols pred) = [[1,1,0],[0,1,1],[0,0,2]]; true marginal [2,2,2], pred marginal [1,2,3], n = 6
    # E = outer([2,2,2], [1,2,3]) / 6: every row is [1/3, 2/3, 1]
    # w = (i-j)^2 = [[0,1,4],[1,0,1],[4,1,0]]
    # sum(w*O) = 1 (0->1) + 1 (1->2) = 2
    # sum(w*E) = (2/3 + 4) + (1/3 + 1) + (4/3 + 2/3) = 14/3 + 4/3 + 2 = 8
    # kappa = 1 - 2/8 = 0.75
    assert quadratic_weighted_kappa(pred, true) == pytest.approx(0.75)
    assert quadratic_weighted_kappa(true, pred) == pytest.approx(0.75)  # symmetric


def test_quadratic_kappa_perfect_chance_and_degenerate():
    assert quadratic_weighted_kappa([0, 3, 5, 8], [0, 3, 5, 8]) == pytest.approx(1.0)
    # pred constant 1, truth 0 and 2: O equals E (= [[0,1,0],[0,0,0],[0,1,0]]), so kappa = 1 - 1 = 0
    assert quadratic_weighted_kappa([1, 1], [0, 2]) == pytest.approx(0.0)
    # Everyone in category 2 on both sides: no chance disagreement to correct for, kappa undefined
    assert math.isnan(quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]))
    assert math.isnan(quadratic_weighted_kappa([], []))


def _sklearn_qwk(pred, true, labels):
    """scikit-learn's cohen_kappa_score(weights='quadratic', labels=labels), written out."""
    index = {v: i for i, v in enumerate(labels)}
    c = np.zeros((len(labels), len(labels)))
    for p, t in zip(pred, true):
        c[index[t], index[p]] += 1
    expected = np.outer(c.sum(axis=1), c.sum(axis=0)) / c.sum()
    w = (np.arange(len(labels))[:, None] - np.arange(len(labels))[None, :]) ** 2
    return 1 - (w * c).sum() / (w * expected).sum()


def test_quadratic_kappa_matches_sklearns_formula_over_all_categories():
    rng = np.random.default_rng(7)
    true = rng.integers(0, 9, size=200)
    pred = np.clip(true + rng.integers(-2, 3, size=200), 0, 8)
    assert quadratic_weighted_kappa(pred, true) == pytest.approx(_sklearn_qwk(pred, true, list(range(9))))
    # With categories 2 and 3 unused, weights still follow the score distance 0..4, as sklearn with labels=0..4
    # (sklearn's default, labels seen = [0, 1, 4], would put 1 and 4 one step apart).
    pred, true = [0, 1, 4, 4], [0, 4, 1, 4]
    assert quadratic_weighted_kappa(pred, true) == pytest.approx(_sklearn_qwk(pred, true, [0, 1, 2, 3, 4]))
    assert quadratic_weighted_kappa(pred, true) != pytest.approx(_sklearn_qwk(pred, true, [0, 1, 4]))


def test_extent_agreement_by_hand():
    pred = [0, 2, 4, 8, np.nan]
    true = [0, 3, 6, 8, 1]
    r = extent_agreement(pred, true)
    # Kept pairs (NaN dropped): |0-0|=0, |2-3|=1, |4-6|=2, |8-8|=0: exact 2/4, within 1: 3/4
    assert r["n"] == 4 and r["exact"] == pytest.approx(0.5) and r["within_1"] == pytest.approx(0.75)
    assert r["kappa"] == pytest.approx(quadratic_weighted_kappa([0, 2, 4, 8], [0, 3, 6, 8]))
    with pytest.raises(ValueError, match="non-negative integer"):
        extent_agreement([-1], [0])


def test_bootstrap_index_ci_resamples_whole_images_by_hand():
    from covidseg.evaluation.agreement import bootstrap_index_ci

    values = np.array([0.0, 1.0])
    low, high = bootstrap_index_ci(2, lambda idx: float(values[idx].mean()), n_resamples=4000, seed=1)
    assert (low, high) == (0.0, 1.0)  # means 0, 0.5, 1 with chances 1/4, 1/2, 1/4
    same = bootstrap_index_ci(5, lambda idx: 3.0, n_resamples=100)
    assert same == (3.0, 3.0)
    assert all(np.isnan(bootstrap_index_ci(3, lambda idx: float("nan"), n_resamples=50)))  # undefined everywhere
    assert all(np.isnan(bootstrap_index_ci(0, lambda idx: 1.0)))
