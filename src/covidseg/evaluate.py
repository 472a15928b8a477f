"""Score the trained model on the test split: every metric of :mod:`covidseg.metrics`, twice
(at the fixed threshold and at the one tuned on val), trivial baselines beside them.

Writes ``metrics_path`` (JSON), ``per_image_csv`` (one row per test image), ``curves_dir``
(``pr.csv``, ``calibration.csv``) and ``predictions_path`` (``.npz``: ids, uint8 probabilities
``round(255 p)`` of shape (N, S, S)) for the figures.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidseg import metrics
from covidseg.atomic import atomic_path, write_json, write_text
from covidseg.device import choose_device, choose_precision
from covidseg.inference import predict_logits, probabilities
from covidseg.modelio import load_model
from covidseg.params import EvaluateParams
from covidseg.preprocess import load_split

EMPTY_TRUTH_RULE = (
    "Per-image Dice/IoU/precision/recall/HD95 are undefined (NaN) when the quantity's denominator is 0, "
    "e.g. Dice when truth and prediction are both empty; such images are left out of the mean. "
    "A false positive on an empty truth scores Dice = IoU = 0. Global ('micro') Dice/IoU use counts summed over all images."
)
PR_BINS = 200


def threshold_metrics(prob: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[dict, pd.DataFrame]:
    """Summary and per-image table at one threshold. prob float (N, S, S); truth bool (N, S, S)."""
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
    for col in ("dice", "iou", "precision", "recall"):
        summary[f"{col}_mean"], summary[f"{col}_std"] = stat(col)
    summary["hd95_mean"], summary["hd95_std"] = stat("hd95")
    finite = per["hd95"].to_numpy()
    summary["hd95_median"] = float(np.nanmedian(finite)) if np.isfinite(finite).any() else float("nan")
    summary["dice_global"] = float(metrics.dice(g)[0])
    summary["iou_global"] = float(metrics.iou(g)[0])
    summary["precision_global"] = float(metrics.precision(g)[0])
    summary["recall_global"] = float(metrics.recall(g)[0])
    summary["images_scored"] = int(np.isfinite(per["dice"]).sum())
    empty = ~truth.reshape(len(truth), -1).any(1)
    if empty.any():
        summary["empty_truth_images"] = int(empty.sum())
        summary["empty_truth_false_positive_images"] = int((c.fp[empty] > 0).sum())
    return summary, per


def pr_curve(prob: np.ndarray, truth: np.ndarray, bins: int = PR_BINS) -> pd.DataFrame:
    """Pixel precision and recall at thresholds k / bins, from histograms of positive and negative pixels."""
    idx = np.clip((prob.reshape(-1) * bins).astype(np.int64), 0, bins - 1)
    t = truth.reshape(-1)
    pos = np.bincount(idx[t], minlength=bins)[::-1].cumsum()[::-1]
    neg = np.bincount(idx[~t], minlength=bins)[::-1].cumsum()[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pos + neg > 0, pos / np.maximum(pos + neg, 1), np.nan)
        recall = pos / max(int(t.sum()), 1)
    return pd.DataFrame({"threshold": np.arange(bins) / bins, "precision": precision, "recall": recall})


def evaluate(model_path: str | Path, prepared_dir: str | Path, metrics_path: str | Path, per_image_csv: str | Path,
             curves_dir: str | Path, predictions_path: str | Path, params: EvaluateParams) -> dict:
    """Evaluate on ``prepared_dir/test.npz``; returns the JSON summary."""
    device = choose_device("auto")
    model, meta = load_model(model_path, device)
    test = load_split(prepared_dir, "test")
    if len(test["images"]) == 0:
        raise ValueError(f"{prepared_dir}/test.npz: the test split is empty")
    logits = predict_logits(model, test["images"], device, choose_precision(device), flip_tta=params.flip_tta)
    prob = probabilities(logits, float(meta.get("temperature", 1.0)))
    truth = test["masks"][:, 0].astype(bool)
    tuned_threshold = float(meta.get("threshold", params.threshold))

    fixed, per_fixed = threshold_metrics(prob, truth, params.threshold)
    tuned, per_tuned = threshold_metrics(prob, truth, tuned_threshold)
    count, psum, tsum = metrics.calibration_bins(prob, truth, params.calibration_bins)
    prevalence_train = _train_prevalence(prepared_dir)
    all_bg = np.zeros_like(prob)
    prior = np.full_like(prob, prevalence_train)
    summary = {
        "n_images": int(len(prob)),
        "rmse": metrics.rmse(prob, truth),
        "dice": fixed["dice_mean"],
        "iou": fixed["iou_mean"],
        "brier": metrics.brier(prob, truth),
        "ece": metrics.expected_calibration_error(count, psum, tsum),
        "at_fixed_threshold": fixed,
        "at_tuned_threshold": tuned,
        "baselines": {
            "all_background": {"rmse": metrics.rmse(all_bg, truth), "dice_mean": _mean_dice(all_bg, truth)},
            "constant_prior": {"prior": prevalence_train, "rmse": metrics.rmse(prior, truth), "dice_mean": _mean_dice(prior, truth)},
        },
        "temperature": float(meta.get("temperature", 1.0)),
        "flip_tta": params.flip_tta,
        "empty_truth_rule": EMPTY_TRUTH_RULE,
    }
    per = pd.DataFrame({"id": test["ids"], "class": test["classes"],
                        "true_fraction": truth.mean((1, 2)), "pred_fraction": (prob >= tuned_threshold).mean((1, 2)),
                        "rmse": np.sqrt(((prob - truth) ** 2).mean((1, 2)))})
    for name, table in (("fixed", per_fixed), ("tuned", per_tuned)):
        for col in table.columns:
            per[f"{col}_{name}"] = table[col].to_numpy()
    curves_dir = Path(curves_dir)
    _write_csv(per_image_csv, per)
    _write_csv(curves_dir / "pr.csv", pr_curve(prob, truth))
    filled = count > 0
    calib = pd.DataFrame({
        "bin_center": (np.arange(params.calibration_bins) + 0.5) / params.calibration_bins,
        "mean_probability": np.where(filled, psum / np.maximum(count, 1), np.nan),
        "fraction_infected": np.where(filled, tsum / np.maximum(count, 1), np.nan),
        "pixels": count.astype(np.int64),
    })
    _write_csv(curves_dir / "calibration.csv", calib)
    with atomic_path(predictions_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=test["ids"], probs=np.round(prob * 255).astype(np.uint8), threshold=tuned_threshold)
    write_json(metrics_path, summary)
    return summary


def _mean_dice(prob: np.ndarray, truth: np.ndarray) -> float:
    d = metrics.dice(metrics.confusion(prob >= 0.5, truth))
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


def _train_prevalence(prepared_dir: str | Path) -> float:
    """Share of infected pixels in the training split (the constant-prior baseline's probability)."""
    with np.load(Path(prepared_dir) / "train.npz") as z:
        return float(z["masks"].mean())


def _write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.6g")
    write_text(path, buf.getvalue())
