"""Score the trained model on the test split: every metric of :mod:`covidseg.evaluation.metrics`, twice
(at the fixed threshold and at the one tuned on val), trivial baselines beside them.

Writes ``metrics_path`` (the headline numbers DVC compares, see :func:`headline`), ``details_path``
(every number, read by the report), ``per_image_csv`` (one row per test image), ``curves_dir``
(``pr.csv``, ``calibration.csv``) and ``predictions_path`` (``.npz``: ids, uint8 probabilities
``round(255 p)`` of shape (N, S, S), the tuned ``threshold``) for the figures.
What each number means is written in ``docs/metrics.md``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from covidseg.evaluation import metrics
from covidseg.atomic import atomic_path, details_path_for, write_json, write_text
from covidseg.device import choose_device, choose_precision
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.model.checkpoint import load_model
from covidseg.params import EvaluateParams
from covidseg.data.arrays import load_split

EMPTY_TRUTH_RULE = (
    "Per-image Dice/IoU/precision/recall/HD95 are undefined (NaN) when the quantity's denominator is 0, "
    "e.g. Dice when truth and prediction are both empty; such images are left out of the mean. "
    "A false positive on an empty truth scores Dice = IoU = 0. Global ('micro') Dice/IoU use counts summed over all images."
)
PR_BINS = 200


def threshold_metrics(prob: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[dict, pd.DataFrame]:
    """Summary and per-image table at one threshold (a pixel is predicted infected when p >= threshold).

    prob float (N, S, S) in [0, 1]; truth bool (N, S, S). The table has one row per image and
    columns dice, iou, precision, recall, hd95 (NaN where undefined, see EMPTY_TRUTH_RULE).
    """
    pred = prob >= threshold
    c = metrics.confusion(pred, truth)
    g = c.total()
    per = pd.DataFrame({
        "dice": metrics.dice(c), "iou": metrics.iou(c), "precision": metrics.precision(c), "recall": metrics.recall(c),
        "hd95": [metrics.hd95(p, t) for p, t in zip(pred, truth)],
    })

    def stat(col: str) -> tuple[float, float]:
        v = per[col].to_numpy()
        v = v[np.isfinite(v)]
        return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))

    summary = {"threshold": float(threshold)}
    for col in ("dice", "iou", "precision", "recall", "hd95"):
        summary[f"{col}_mean"], summary[f"{col}_std"] = stat(col)
    hd = per["hd95"].to_numpy()
    summary["hd95_median"] = float(np.median(hd[np.isfinite(hd)])) if np.isfinite(hd).any() else float("nan")
    summary["dice_global"] = float(metrics.dice(g)[0])
    summary["iou_global"] = float(metrics.iou(g)[0])
    summary["precision_global"] = float(metrics.precision(g)[0])
    summary["recall_global"] = float(metrics.recall(g)[0])
    summary["images_scored"] = int(np.isfinite(per["dice"]).sum())
    summary["hd95_undefined_images"] = int((~np.isfinite(hd)).sum())
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
    """Reliability-diagram rows from :func:`covidseg.evaluation.metrics.calibration_bins` totals (each (B,)).

    One row per bin that holds at least one pixel (empty bins have no mean and are left out):
    bin_lo, bin_hi (edges), mean_probability, fraction_infected, pixels.
    """
    bins = len(count)
    filled = np.flatnonzero(count > 0)
    return pd.DataFrame({
        "bin_lo": filled / bins, "bin_hi": (filled + 1) / bins,
        "mean_probability": psum[filled] / count[filled],
        "fraction_infected": tsum[filled] / count[filled],
        "pixels": count[filled].astype(np.int64),
    })


def baselines(truth: np.ndarray, lungs: np.ndarray | None, prior: float) -> dict:
    """Trivial predictors scored like the model, so RMSE and Dice have context.

    all_background: p = 0 everywhere. constant_prior: p = ``prior`` (the train split's infected
    pixel share) everywhere. lung_mask (when ``lungs`` bool (N, S, S) is given): p = 0.5 inside
    the *true* lung fields, 0 outside, i.e. "the whole lung is infected", which needs no model
    but the lung masks. Each: rmse, brier, per-image mean Dice and global Dice at threshold 0.5.
    """
    candidates = {"all_background": (np.zeros(truth.shape, np.float32), {}),
                  "constant_prior": (np.full(truth.shape, prior, np.float32), {"prior": float(prior)})}
    if lungs is not None:
        candidates["lung_mask"] = (np.where(lungs, np.float32(0.5), np.float32(0.0)), {})
    out = {}
    for name, (prob, extra) in candidates.items():
        c = metrics.confusion(prob >= 0.5, truth)
        d = metrics.dice(c)
        out[name] = {**extra, "rmse": metrics.rmse(prob, truth), "brier": metrics.brier(prob, truth),
                     "dice_mean": float(np.nanmean(d)) if np.isfinite(d).any() else float("nan"),
                     "dice_global": float(metrics.dice(c.total())[0])}
    return out


def headline(summary: dict) -> dict:
    """The few test numbers declared as DVC metrics (what ``dvc exp show`` and ``dvc metrics diff`` list).

    ``rmse``, ``dice`` and ``iou`` keep the report's protocol (calibrated probabilities; per-image
    mean at threshold 0.5); ``*_at_threshold`` use the val-tuned threshold; ``covid19_*`` are the
    same over the COVID-19 images alone (equal to the headline when only COVID-19 is in the split).
    Everything else is in the details file.
    """
    fixed, tuned = summary["at_fixed_threshold"], summary["at_tuned_threshold"]
    covid = (summary.get("by_class") or {}).get("COVID-19") or {}
    return {
        "n_images": summary["n_images"],
        "rmse": summary["rmse"], "dice": summary["dice"], "iou": summary["iou"],
        "brier": summary["brier"], "ece": summary["ece"],
        "threshold": tuned["threshold"], "dice_at_threshold": tuned["dice_mean"], "iou_at_threshold": tuned["iou_mean"],
        "dice_global": fixed["dice_global"], "precision": fixed["precision_mean"], "recall": fixed["recall_mean"],
        "hd95_median": fixed["hd95_median"],
        "covid19_rmse": covid.get("rmse", float("nan")), "covid19_dice": covid.get("dice", float("nan")),
    }


def evaluate(model_path: str | Path, prepared_dir: str | Path, metrics_path: str | Path, per_image_csv: str | Path,
             curves_dir: str | Path, predictions_path: str | Path, params: EvaluateParams,
             details_path: str | Path | None = None) -> dict:
    """Evaluate on ``prepared_dir/test.npz``; returns the full summary (the details file's content).

    ``details_path`` defaults to :func:`details_path_for` ``(metrics_path)``.
    """
    device = choose_device("auto")
    model, meta = load_model(model_path, device)
    test = load_split(prepared_dir, "test")
    if len(test["images"]) == 0:
        raise ValueError(f"{prepared_dir}/test.npz: the test split is empty")
    calibration = Calibration.from_meta(meta)  # inference exactly as calibrated on val
    prob = calibrated_probabilities(model, test["images"], device, choose_precision(device), calibration)
    truth = test["masks"][:, 0].astype(bool)
    tuned_threshold = params.threshold if calibration.threshold is None else calibration.threshold

    fixed, per_fixed = threshold_metrics(prob, truth, params.threshold)
    tuned, per_tuned = threshold_metrics(prob, truth, tuned_threshold)
    count, psum, tsum = metrics.calibration_bins(prob, truth, params.calibration_bins)
    lungs = test["lungs"][:, 0].astype(bool) if "lungs" in test else None
    summary = {
        "n_images": int(len(prob)),
        "rmse": metrics.rmse(prob, truth),
        "dice": fixed["dice_mean"],
        "iou": fixed["iou_mean"],
        "brier": metrics.brier(prob, truth),
        "ece": metrics.expected_calibration_error(count, psum, tsum),
        "ece_bins": params.calibration_bins,
        "at_fixed_threshold": fixed,
        "at_tuned_threshold": tuned,
        "baselines": baselines(truth, lungs, _train_prevalence(prepared_dir)),
        "temperature": calibration.temperature,
        "flip_tta": calibration.flip_tta,
        "lung_gate": calibration.lung_gate,
        "empty_truth_rule": EMPTY_TRUTH_RULE,
    }
    per = pd.DataFrame({"id": test["ids"], "class": test["classes"],
                        "true_fraction": truth.mean((1, 2)), "pred_fraction": (prob >= tuned_threshold).mean((1, 2)),
                        "rmse": np.sqrt(((prob - truth) ** 2).mean((1, 2), dtype=np.float64))})
    for name, table in (("fixed", per_fixed), ("tuned", per_tuned)):
        for col in table.columns:
            per[f"{col}_{name}"] = table[col].to_numpy()
    curves_dir = Path(curves_dir)
    summary["by_class"] = class_breakdown(per)
    _write_csv(per_image_csv, per)
    _write_csv(curves_dir / "pr.csv", pr_curve(prob, truth))
    _write_csv(curves_dir / "calibration.csv", calibration_table(count, psum, tsum))
    with atomic_path(predictions_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=test["ids"], probs=np.round(prob * 255).astype(np.uint8), threshold=tuned_threshold)
    write_json(details_path or details_path_for(metrics_path), summary)
    write_json(metrics_path, headline(summary))
    return summary


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


def _train_prevalence(prepared_dir: str | Path) -> float:
    """Share of infected pixels in the training split (the constant-prior baseline's probability)."""
    path = Path(prepared_dir) / "train.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the train split is missing (the constant-prior baseline needs its prevalence)")
    with np.load(path) as z:
        return float(z["masks"].mean(dtype=np.float64))


def _write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.6g")
    write_text(path, buf.getvalue())
