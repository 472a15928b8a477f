"""Segmentation metrics: the per-image and global tables, calibration, HD95 and the trivial baselines.

The confusion counts and the ratios made from them (Dice, IoU, precision, recall) are
:mod:`covidseg.masks.counts`, shared with training's calibration; this module builds on them.

Shapes: ``pred`` and ``truth`` are boolean arrays (N, H, W) (one mask per image);
``prob`` is float (N, H, W) in [0, 1]. Counts are int64 arrays (N,).

Empty-truth rule (nnU-Net's; not MONAI's default, docs/metrics.md): an image whose truth *and* prediction are both
empty has an undefined Dice/IoU (NaN) and is left out of per-image means; a false
positive on an empty truth scores 0. ``empty_score`` overrides the NaN. The same rule holds
for every ratio: precision is NaN on an image with no predicted pixel, recall on an image
with no infected pixel, HD95 when either mask is empty.

Conventions are written out in ``docs/metrics.md``; ``tests/test_metrics.py`` checks each
formula on hand-computed cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from covidseg.masks.counts import (
    Counts,
    confusion,
    dice,
    iou,
    precision,
    recall,
    same_shape,
    squared_error_sum,
)


def brier(prob: np.ndarray, truth: np.ndarray) -> float:
    """Brier score: (1 / P) sum over all P pixels of (p - t)^2, unitless in [0, 1]."""
    if np.size(prob) == 0:
        raise ValueError("brier: no pixels to score")
    return squared_error_sum(prob, truth) / np.size(prob)


def rmse(prob: np.ndarray, truth: np.ndarray) -> float:
    """sqrt(Brier): root mean squared error over all pixels of probabilities vs the 0/1 truth (the report's metric)."""
    return float(np.sqrt(brier(prob, truth)))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with at least one 4-neighbour outside it (or on the image border), as MONAI."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th-percentile Hausdorff distance in pixels between two boolean masks (H, W), as MONAI computes it.

    For each surface pixel of ``pred`` take the Euclidean distance to the nearest surface pixel
    of ``truth``, and the same the other way; HD95 = max(P95(pred -> truth), P95(truth -> pred)),
    with numpy's linear-interpolation percentile. 0 when the masks are identical; NaN when
    either mask is empty (undefined, left out of means).
    """
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    same_shape(pred, truth, "pred", "truth")
    if pred.ndim != 2:
        raise ValueError(f"hd95 takes one mask (H, W) at a time, got shape {pred.shape}")
    if not pred.any() or not truth.any():
        return float("nan")
    sp, st = _surface(pred), _surface(truth)
    pred_to_truth = ndimage.distance_transform_edt(~st)[sp]
    truth_to_pred = ndimage.distance_transform_edt(~sp)[st]
    return float(max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95)))


def expected_calibration_error(bin_count: np.ndarray, bin_prob_sum: np.ndarray, bin_pos_sum: np.ndarray) -> float:
    """ECE = sum_b (n_b / n) |mean truth_b - mean prob_b| from per-bin totals (each (B,)).

    ``bin_count`` n_b pixels per bin, ``bin_prob_sum`` the sum of their probabilities,
    ``bin_pos_sum`` how many of them are infected (see :func:`calibration_bins`). NaN for no pixels.
    """
    bin_count, bin_prob_sum, bin_pos_sum = (np.asarray(a, np.float64) for a in (bin_count, bin_prob_sum, bin_pos_sum))
    n = bin_count.sum()
    if n == 0:
        return float("nan")
    filled = bin_count > 0
    gap = np.abs(bin_pos_sum[filled] - bin_prob_sum[filled]) / bin_count[filled]
    return float(np.sum(bin_count[filled] / n * gap))


def calibration_bins(prob: np.ndarray, truth: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin pixel count, sum of probabilities and sum of truths, each float64 (bins,).

    Bin b holds the pixels with b / bins <= p < (b + 1) / bins; p = 1 falls in the last bin.
    """
    if bins < 1:
        raise ValueError(f"calibration_bins: bins must be >= 1, got {bins}")
    same_shape(np.asarray(prob), np.asarray(truth), "prob", "truth")
    p = np.asarray(prob).reshape(-1).astype(np.float64)
    idx = np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    psum = np.bincount(idx, weights=p, minlength=bins)
    tsum = np.bincount(idx, weights=np.asarray(truth).reshape(-1).astype(np.float64), minlength=bins)
    return count, psum, tsum


EMPTY_TRUTH_RULE = (
    "Per-image Dice/IoU/precision/recall/HD95 are undefined (NaN) when the quantity's denominator is 0, "
    "e.g. Dice when truth and prediction are both empty; such images are left out of the mean. "
    "A false positive on an empty truth scores Dice = IoU = 0. Global ('micro') Dice/IoU use counts summed over all images."
)
PR_BINS = 200


@dataclass(frozen=True)
class MaskMetric:
    """One per-image metric of a thresholded mask: how it is computed and how each output reports it.

    ``per_image(pred, truth, counts)`` gives float64 (N,) from bool masks (N, S, S) and their
    :class:`Counts`, NaN where undefined (EMPTY_TRUTH_RULE). ``pooled(counts)`` gives the global
    ('micro') value from counts summed over images, shape (1,), or is None when the metric has none.
    Summaries hold ``{name}_mean`` and ``{name}_std`` (over the images where it is defined), with
    ``median`` also ``{name}_median``, with ``pooled`` also ``{name}_global``. ``interval``: the
    headline carries a 95 % bootstrap interval of the per-image mean at the fixed threshold.
    ``headline``: which summary numbers ``metrics/test.json`` lists: "mean" as ``{name}``
    (fixed threshold), "tuned_mean" as ``{name}_at_threshold``, "global" as ``{name}_global``,
    "median" as ``{name}_median`` (fixed threshold). ``label``, ``unit``, ``digits`` and
    ``definition`` are what the report and the model card print.
    """

    name: str
    label: str
    definition: str
    per_image: Callable[[np.ndarray, np.ndarray, Counts], np.ndarray]
    pooled: Callable[[Counts], np.ndarray] | None = None
    median: bool = False
    interval: bool = False
    headline: tuple[str, ...] = ()
    unit: str = ""
    digits: int = 4


HEADLINE_STATS = ("mean", "tuned_mean", "global", "median")


# The one table of per-image mask metrics: threshold_metrics' columns, the headline, the report's
# rows and the model card's come from it. A new metric is a row here, its test and its line in docs/metrics.md.
def _count_metric(name: str, label: str, definition: str, ratio: Callable[[Counts], np.ndarray], **kw) -> MaskMetric:
    """A metric that is a ratio of confusion counts: per image from each image's counts, pooled from their sum."""
    return MaskMetric(name, label, definition, lambda pred, truth, c: ratio(c), pooled=ratio, **kw)


MASK_METRICS: tuple[MaskMetric, ...] = (
    _count_metric(
        "dice",
        "Dice",
        "2TP / (2TP + FP + FN) of the mask p ≥ threshold. Per-image: computed on each image, then mean ± std "
        "(population) over images; global: from TP, FP, FN summed over the split.",
        dice,
        interval=True,
        headline=("mean", "tuned_mean", "global"),
    ),
    _count_metric(
        "iou",
        "IoU",
        "TP / (TP + FP + FN) (Jaccard), per-image and global as for Dice.",
        iou,
        interval=True,
        headline=("mean",),
    ),
    _count_metric("precision", "Precision", "TP / (TP + FP): the share of pixels called infected that are.", precision),
    _count_metric("recall", "Recall", "TP / (TP + FN): the share of infected pixels found (sensitivity).", recall),
    MaskMetric(
        "hd95",
        "HD95",
        "95th-percentile Hausdorff distance in pixels between the predicted and true mask surfaces: "
        "max of the two directed 95th percentiles (MONAI's convention). Lower is better.",
        lambda pred, truth, c: np.array([hd95(p, t) for p, t in zip(pred, truth)], dtype=np.float64),
        median=True,
        headline=("median",),
        unit="pixels",
        digits=2,
    ),
)


def headline_key(metric: MaskMetric, stat: str) -> str:
    """The key ``metrics/test.json`` gives one of a metric's ``HEADLINE_STATS``: dice + tuned_mean -> dice_at_threshold."""
    suffix = {"mean": "", "tuned_mean": "_at_threshold", "global": "_global", "median": "_median"}
    if stat not in suffix:
        raise ValueError(f"headline stat must be one of {HEADLINE_STATS}, got {stat!r}")
    return metric.name + suffix[stat]


def _finite_mean_std(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def threshold_metrics(prob: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[dict, pd.DataFrame]:
    """Summary and per-image table at one threshold (a pixel is predicted infected when p >= threshold).

    prob float (N, S, S) in [0, 1]; truth bool (N, S, S). The table has one row per image and one
    column per :data:`MASK_METRICS` entry (NaN where undefined, see EMPTY_TRUTH_RULE).
    """
    pred = prob >= threshold
    c = confusion(pred, truth)
    g = c.total()
    table = MASK_METRICS  # read once, so a test may swap the module's table
    per = pd.DataFrame({m.name: m.per_image(pred, truth, c) for m in table})
    summary = {"threshold": float(threshold)}
    for m in table:
        summary[f"{m.name}_mean"], summary[f"{m.name}_std"] = _finite_mean_std(per[m.name].to_numpy())
    for m in table:
        if m.median:
            v = per[m.name].to_numpy()
            summary[f"{m.name}_median"] = float(np.median(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
    for m in table:
        if m.pooled is not None:
            summary[f"{m.name}_global"] = float(m.pooled(g)[0])
    summary["images_scored"] = int(np.isfinite(per["dice"]).sum())
    summary["hd95_undefined_images"] = int((~np.isfinite(per["hd95"].to_numpy())).sum())
    empty = ~truth.reshape(len(truth), -1).any(1)
    summary["empty_truth_images"] = int(empty.sum())
    summary["empty_truth_false_positive_images"] = int((c.fp[empty] > 0).sum())
    return summary, per


def pr_curve(prob: np.ndarray, truth: np.ndarray, bins: int = PR_BINS) -> pd.DataFrame:
    """Pixel precision and recall at each threshold t_k = k / bins, k = 0 .. bins - 1.

    A pixel counts as predicted at t_k when p >= t_k (the rule of :func:`threshold_metrics`), so
    row k equals the global precision/recall there. prob float (N, S, S) (any shape), truth bool
    of the same shape. Precision is NaN where nothing is predicted, recall NaN with no infected pixel.
    """
    thresholds = np.arange(bins) / bins
    p = np.asarray(prob).reshape(-1)
    t = np.asarray(truth).reshape(-1).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"pr_curve: prob {np.shape(prob)} and truth {np.shape(truth)} differ in shape")
    # k = the largest k with t_k <= p, so "p >= t_k" <=> k_p >= k; -1 for p < 0 (never predicted).
    idx = np.searchsorted(thresholds, p.astype(np.float64), side="right") - 1
    keep = idx >= 0
    pos = np.bincount(idx[keep & t], minlength=bins)[::-1].cumsum()[::-1]
    neg = np.bincount(idx[keep & ~t], minlength=bins)[::-1].cumsum()[::-1]
    n_pos = int(t.sum())
    precision = np.where(pos + neg > 0, pos / np.maximum(pos + neg, 1), np.nan)
    recall = pos / n_pos if n_pos else np.full(bins, np.nan)
    return pd.DataFrame({"threshold": thresholds, "precision": precision, "recall": recall})


def calibration_table(count: np.ndarray, psum: np.ndarray, tsum: np.ndarray) -> pd.DataFrame:
    """Reliability-diagram rows from :func:`calibration_bins` totals (each (B,)).

    One row per bin that holds at least one pixel (empty bins have no mean and are left out):
    bin_lo, bin_hi (edges), mean_probability, fraction_infected, pixels.
    """
    bins = len(count)
    filled = np.flatnonzero(count > 0)
    return pd.DataFrame(
        {
            "bin_lo": filled / bins,
            "bin_hi": (filled + 1) / bins,
            "mean_probability": psum[filled] / count[filled],
            "fraction_infected": tsum[filled] / count[filled],
            "pixels": count[filled].astype(np.int64),
        }
    )


def baselines(truth: np.ndarray, lungs: np.ndarray | None, prior: float) -> dict:
    """Trivial predictors scored like the model, so RMSE and Dice have context.

    all_background: p = 0 everywhere. constant_prior: p = ``prior`` (the train split's infected
    pixel share) everywhere. lung_mask (when ``lungs`` bool (N, S, S) is given): p = 0.5 inside
    the *true* lung fields, 0 outside, i.e. "the whole lung is infected", which needs no model
    but the lung masks. Each: rmse, brier, per-image mean Dice and global Dice at threshold 0.5.
    """
    candidates = {
        "all_background": (np.zeros(truth.shape, np.float32), {}),
        "constant_prior": (np.full(truth.shape, prior, np.float32), {"prior": float(prior)}),
    }
    if lungs is not None:
        candidates["lung_mask"] = (np.where(lungs, np.float32(0.5), np.float32(0.0)), {})
    out = {}
    for name, (prob, extra) in candidates.items():
        c = confusion(prob >= 0.5, truth)
        d = dice(c)
        out[name] = {
            **extra,
            "rmse": rmse(prob, truth),
            "brier": brier(prob, truth),
            "dice_mean": float(np.nanmean(d)) if np.isfinite(d).any() else float("nan"),
            "dice_global": float(dice(c.total())[0]),
        }
    return out


def class_breakdown(per: pd.DataFrame) -> dict:
    """Headline metrics per image class, from the per-image table, so runs with negatives stay comparable.

    ``per`` has one row per image with ``class``, ``rmse`` (per-image pixel RMSE), ``true_fraction``,
    ``pred_fraction`` (at the tuned threshold), ``dice_fixed``/``iou_fixed`` and ``dice_tuned``/``iou_tuned``
    (NaN where the empty-truth rule leaves an image out). Per class: images, RMSE over its pixels
    (every image has the same pixel count, so the root of the mean per-image MSE), mean per-image
    Dice/IoU at the fixed and the tuned threshold (NaN if no image is scored), images with empty
    truth and, of those, images with any pixel predicted at the tuned threshold.
    """
    out = {}
    for name, rows in per.groupby("class", sort=True):
        empty = rows["true_fraction"] == 0
        out[str(name)] = {
            "n_images": int(len(rows)),
            "rmse": float(np.sqrt(np.mean(rows["rmse"].to_numpy(np.float64) ** 2))),
            "dice": float(rows["dice_fixed"].mean()),  # pandas skips NaN; all NaN gives NaN
            "dice_at_tuned_threshold": float(rows["dice_tuned"].mean()),
            "iou": float(rows["iou_fixed"].mean()),
            "iou_at_tuned_threshold": float(rows["iou_tuned"].mean()),
            "empty_truth_images": int(empty.sum()),
            "empty_truth_false_positive_images": int((empty & (rows["pred_fraction"] > 0)).sum()),
        }
    return out
