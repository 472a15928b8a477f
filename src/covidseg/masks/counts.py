"""Confusion counts of boolean masks and the ratios made from them, with an explicit empty-mask policy.

Shapes: ``pred`` and ``truth`` are boolean arrays (N, H, W) (one mask per image) or (H, W);
``prob`` is float (N, H, W) in [0, 1]. Counts are int64 arrays (N,).

Empty-truth rule (nnU-Net's): an image whose truth *and* prediction are both empty has an
undefined Dice/IoU (NaN); a false positive on an empty truth scores 0. ``empty_score``
overrides the NaN. Precision is NaN with no predicted pixel, recall with no infected pixel.
Evaluation (:mod:`covidseg.evaluation.metrics`) and training's calibration both use these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Counts:
    """Per-image confusion counts, each int64 (N,)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    def total(self) -> Counts:
        """Counts summed over images, as arrays of shape (1,) (for global, 'micro' metrics)."""
        return Counts(*(np.array([a.sum()], dtype=np.int64) for a in (self.tp, self.fp, self.fn, self.tn)))


def confusion(pred: np.ndarray, truth: np.ndarray) -> Counts:
    """Per-image TP, FP, FN, TN of boolean masks (N, H, W)."""
    pred, truth = as_batch(pred).astype(bool), as_batch(truth).astype(bool)
    same_shape(pred, truth, "pred", "truth")
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


def squared_error_sum(prob: np.ndarray, truth: np.ndarray, chunk: int = 64) -> float:
    """Sum over all pixels of (p - t)^2, accumulated in float64 ``chunk`` images at a time.

    prob float (N, H, W) (or (H, W)) in [0, 1]; truth bool or {0, 1} of the same shape.
    Chunking keeps memory at a few float64 copies of ``chunk`` images, not of the whole split.
    """
    prob, truth = as_batch(prob), as_batch(truth)
    same_shape(prob, truth, "prob", "truth")
    total = 0.0
    for s in range(0, len(prob), chunk):
        diff = prob[s : s + chunk].astype(np.float64) - truth[s : s + chunk].astype(np.float64)
        total += float(np.sum(diff * diff))
    return total


def same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} differ in shape")


def as_batch(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[None] if a.ndim == 2 else a


# ---------------------------------------------------------------- tables over a split
