"""Agreement between predicted and reference per-image values, and bootstrap uncertainty.

Inputs are 1-D sequences of per-image values (N,), e.g. infected shares in percent or
extent scores 0-8; paired functions take two such sequences over the same images in the
same order. NaN policy: a NaN value (or, for pairs, a pair with a NaN on either side) is
dropped before computing; a statistic with too little left is NaN. Every resampling uses
``numpy.random.default_rng(seed)`` so results are reproducible.

This module depends only on numpy and scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


def _vector(a: ArrayLike, name: str) -> np.ndarray:
    """``a`` as a float 1-D array, or a ValueError naming it."""
    a = np.asarray(a, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per image), got shape {a.shape}")
    return a


def _pairs(a: ArrayLike, b: ArrayLike, names=("pred", "true")) -> tuple[np.ndarray, np.ndarray]:
    """Two 1-D float arrays of equal length with every pair holding a NaN removed."""
    a, b = _vector(a, names[0]), _vector(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same length, got {len(a)} and {len(b)}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


# ---------------------------------------------------------------- bootstrap


def bootstrap_ci(
    values: ArrayLike,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (low, high) of ``statistic`` over images.

    NaN values are dropped first (an image without a value carries no information on the
    statistic). Each of ``n_resamples`` resamples draws as many images as remain, with
    replacement; the interval is the (1 - level) / 2 and (1 + level) / 2 percentiles of the
    resampled statistics. (NaN, NaN) when no value remains.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    values = _vector(values, "values")
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))
    resampled = np.array([statistic(values[i]) for i in idx], dtype=float)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_index_ci(
    n: int, statistic: Callable[[np.ndarray], float], n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of several per-image arrays at once.

    ``statistic(idx)`` computes the statistic on the images ``idx`` (int array, with repeats), so
    paired measures (kappa, correlation, pooled RMSE) resample whole images. Resamples whose
    statistic is NaN (e.g. kappa of one category) are left out. (NaN, NaN) for n = 0.
    """
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(n_resamples)], dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


class PairedDiff(NamedTuple):
    """Result of :func:`paired_bootstrap_diff`: statistic of ``a - b``, its interval, and n pairs used."""

    diff: float
    low: float
    high: float
    excludes_zero: bool
    n: int


def paired_bootstrap_diff(
    a: ArrayLike,
    b: ArrayLike,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDiff:
    """Difference between two runs' per-image values on the same images, ``a - b``, with a paired bootstrap CI.

    Pairs with a NaN on either side are dropped. Images are resampled as pairs (the
    per-image differences are bootstrapped), which keeps the correlation between runs.
    ``excludes_zero`` is True when 0 lies outside [low, high].
    """
    a, b = _pairs(a, b, names=("a", "b"))
    d = a - b
    if d.size == 0:
        return PairedDiff(float("nan"), float("nan"), float("nan"), False, 0)
    low, high = bootstrap_ci(d, statistic, n_resamples, seed, level)
    return PairedDiff(float(statistic(d)), low, high, bool(low > 0 or high < 0), int(d.size))


# ---------------------------------------------------------------- continuous agreement


def share_mae(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean absolute error, in the inputs' units (percentage points for shares); NaN with no pair."""
    pred, true = _pairs(pred, true)
    return float(np.mean(np.abs(pred - true))) if pred.size else float("nan")


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation; NaN with fewer than 2 pairs or when either side is constant."""
    x, y = _pairs(x, y, names=("x", "y"))
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    # math.fsum, not a BLAS dot product: BLAS picks its summation order by CPU, and the last digit
    # of a committed metric must not depend on the machine (fsum is exactly rounded).
    sxx, syy, sxy = math.fsum(dx * dx), math.fsum(dy * dy), math.fsum(dx * dy)
    denom = math.sqrt(sxx * syy)
    return float(sxy / denom) if denom > 0 else float("nan")


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties given their average rank; NaN when constant."""
    x, y = _pairs(x, y, names=("x", "y"))
    return pearson(stats.rankdata(x), stats.rankdata(y))


@dataclass(frozen=True)
class BlandAltman:
    """Bland-Altman agreement of ``pred`` with ``true``: differences are pred - true.

    ``bias`` is the mean difference, ``sd`` the sample standard deviation (ddof=1) of the
    differences, ``lower``/``upper`` the 95 % limits of agreement bias -+ 1.96 sd;
    ``means`` (pred + true) / 2 and ``diffs`` (n,) are the points of the plot.
    """

    bias: float
    sd: float
    lower: float
    upper: float
    means: np.ndarray
    diffs: np.ndarray
    n: int


def bland_altman(pred: ArrayLike, true: ArrayLike) -> BlandAltman:
    """Bland & Altman (Lancet 1986) bias and 95 % limits of agreement; NaN pairs dropped, sd NaN below 2 pairs."""
    pred, true = _pairs(pred, true)
    diffs, means = pred - true, (pred + true) / 2
    bias = float(diffs.mean()) if diffs.size else float("nan")
    sd = float(diffs.std(ddof=1)) if diffs.size >= 2 else float("nan")
    return BlandAltman(bias, sd, bias - 1.96 * sd, bias + 1.96 * sd, means, diffs, int(diffs.size))


# ---------------------------------------------------------------- ordinal (extent score) agreement


def _categories(pred: ArrayLike, true: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Integer category arrays (n,) from pred/true with NaN pairs dropped; non-integer or negative values refused."""
    pred, true = _pairs(pred, true)
    for name, a in (("pred", pred), ("true", true)):
        bad = (a != np.round(a)) | (a < 0)
        if bad.any():
            raise ValueError(f"{name} must hold non-negative integer categories, got {a[bad][0]!r}")
    return pred.astype(np.int64), true.astype(np.int64)


def confusion_matrix(pred: ArrayLike, true: ArrayLike, k: int) -> np.ndarray:
    """Counts int64 (k + 1, k + 1) over categories 0..k: row = true category, column = predicted."""
    pred, true = _categories(pred, true)
    for name, a in (("pred", pred), ("true", true)):
        if a.size and a.max() > k:
            raise ValueError(f"{name} holds category {a.max()} above k={k}")
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    np.add.at(matrix, (true, pred), 1)
    return matrix


def quadratic_weighted_kappa(pred: ArrayLike, true: ArrayLike) -> float:
    """Cohen's kappa with quadratic weights over the integer categories 0..K (K = largest value seen).

    kappa = 1 - sum(w * O) / sum(w * E) with w_ij = (i - j)^2, O the confusion matrix and
    E = outer(true marginal, pred marginal) / n the matrix expected by chance. Weights are
    the category values' distances, so a category nobody used still counts in the
    distance (scikit-learn, by default, indexes only the labels present). Symmetric in
    pred and true. Degenerate case: when pred and true all sit in one and the same
    category, sum(w * E) = 0 and kappa is undefined: NaN (the exact share is then 1).
    NaN with no pair.
    """
    pred, true = _categories(pred, true)
    if pred.size == 0:
        return float("nan")
    k = int(max(pred.max(), true.max()))
    observed = confusion_matrix(pred, true, k).astype(float)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    i, j = np.indices(observed.shape)
    weights = (i - j) ** 2
    chance = float((weights * expected).sum())
    return 1 - float((weights * observed).sum()) / chance if chance > 0 else float("nan")


def extent_agreement(pred_scores: ArrayLike, true_scores: ArrayLike) -> dict[str, float]:
    """Agreement of extent scores (n,): ``exact`` share of equal scores, ``within_1`` share off by at most 1,
    ``kappa`` (quadratic weighted), and ``n`` pairs used (NaN pairs dropped). Shares in [0, 1]."""
    pred, true = _categories(pred_scores, true_scores)
    n = int(pred.size)
    off = np.abs(pred - true)
    return {
        "exact": float(np.mean(off == 0)) if n else float("nan"),
        "within_1": float(np.mean(off <= 1)) if n else float("nan"),
        "kappa": quadratic_weighted_kappa(pred, true),
        "n": n,
    }
