"""Segmentation metrics from confusion counts, with an explicit empty-mask policy.

Shapes: ``pred`` and ``truth`` are boolean arrays (N, H, W) (one mask per image);
``prob`` is float (N, H, W) in [0, 1]. Counts are int64 arrays (N,).

Empty-truth rule (as nnU-Net and MONAI): an image whose truth *and* prediction are both
empty has an undefined Dice/IoU (NaN) and is left out of per-image means; a false
positive on an empty truth scores 0. ``empty_score`` overrides the NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Counts:
    """Per-image confusion counts, each int64 (N,)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    def total(self) -> "Counts":
        """Counts summed over images, as arrays of shape (1,) (for global, 'micro' metrics)."""
        return Counts(*(np.array([a.sum()], dtype=np.int64) for a in (self.tp, self.fp, self.fn, self.tn)))


def confusion(pred: np.ndarray, truth: np.ndarray) -> Counts:
    """Per-image TP, FP, FN, TN of boolean masks (N, H, W)."""
    pred, truth = _as_batch(pred).astype(bool), _as_batch(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ in shape")
    axes = tuple(range(1, pred.ndim))
    tp = np.sum(pred & truth, axis=axes, dtype=np.int64)
    fp = np.sum(pred & ~truth, axis=axes, dtype=np.int64)
    fn = np.sum(~pred & truth, axis=axes, dtype=np.int64)
    tn = np.sum(~pred & ~truth, axis=axes, dtype=np.int64)
    return Counts(tp, fp, fn, tn)


def _ratio(num: np.ndarray, den: np.ndarray, empty_score: float) -> np.ndarray:
    num, den = num.astype(np.float64), den.astype(np.float64)
    out = np.full(num.shape, empty_score, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def dice(c: Counts, empty_score: float = np.nan) -> np.ndarray:
    """2TP / (2TP + FP + FN) per image; ``empty_score`` when truth and prediction are empty."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, empty_score)


def iou(c: Counts, empty_score: float = np.nan) -> np.ndarray:
    """TP / (TP + FP + FN) per image (Jaccard); ``empty_score`` when both are empty."""
    return _ratio(c.tp, c.tp + c.fp + c.fn, empty_score)


def precision(c: Counts, empty_score: float = np.nan) -> np.ndarray:
    """TP / (TP + FP): the share of predicted pixels that are infected; undefined with no prediction."""
    return _ratio(c.tp, c.tp + c.fp, empty_score)


def recall(c: Counts, empty_score: float = np.nan) -> np.ndarray:
    """TP / (TP + FN): the share of infected pixels found (sensitivity); undefined on empty truth."""
    return _ratio(c.tp, c.tp + c.fn, empty_score)


def squared_error_sum(prob: np.ndarray, truth: np.ndarray) -> float:
    """Sum over all pixels of (p - t)^2, in float64 (to accumulate RMSE and Brier over batches)."""
    diff = prob.astype(np.float64) - truth.astype(np.float64)
    return float(np.sum(diff * diff))


def rmse(prob: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error over all pixels between probabilities and the 0/1 truth (the report's metric)."""
    if prob.shape != truth.shape:
        raise ValueError(f"prob {prob.shape} and truth {truth.shape} differ in shape")
    return float(np.sqrt(squared_error_sum(prob, truth) / prob.size))


def brier(prob: np.ndarray, truth: np.ndarray) -> float:
    """Brier score: mean over pixels of (p - t)^2 (RMSE squared)."""
    return rmse(prob, truth) ** 2


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels between two boolean masks (H, W).

    Distances go from each surface pixel of one mask to the nearest surface pixel of the
    other (Euclidean); the 95th percentile of both directions pooled is returned. NaN
    when either mask is empty (undefined), 0 when they are identical.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ in shape")
    if not pred.any() or not truth.any():
        return float("nan")
    sp, st = _surface(pred), _surface(truth)
    d_to_t = ndimage.distance_transform_edt(~st)
    d_to_p = ndimage.distance_transform_edt(~sp)
    distances = np.concatenate([d_to_t[sp], d_to_p[st]])
    return float(np.percentile(distances, 95))


def expected_calibration_error(bin_count: np.ndarray, bin_prob_sum: np.ndarray, bin_pos_sum: np.ndarray) -> float:
    """ECE = sum_b (n_b / n) |mean truth_b - mean prob_b| from per-bin totals (each (B,))."""
    n = bin_count.sum()
    if n == 0:
        return float("nan")
    filled = bin_count > 0
    gap = np.abs(bin_pos_sum[filled] - bin_prob_sum[filled]) / bin_count[filled]
    return float(np.sum(bin_count[filled] / n * gap))


def calibration_bins(prob: np.ndarray, truth: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin pixel count, sum of probabilities and sum of truths for ``bins`` equal-width bins of [0, 1]."""
    p = prob.reshape(-1).astype(np.float64)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    psum = np.bincount(idx, weights=p, minlength=bins)
    tsum = np.bincount(idx, weights=truth.reshape(-1).astype(np.float64), minlength=bins)
    return count, psum, tsum


def _as_batch(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[None] if a.ndim == 2 else a
