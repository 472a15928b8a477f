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

from covidseg.atomic import atomic_path, details_path_for, write_json, write_text
from covidseg.data.arrays import load_split
from covidseg.device import choose_device, choose_precision
from covidseg.evaluation import metrics
from covidseg.evaluation.metrics import (
    EMPTY_TRUTH_RULE,
    baselines,
    calibration_table,
    class_breakdown,
    pr_curve,
    threshold_metrics,
)
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.model.checkpoint import load_model
from covidseg.params import EvaluateParams


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
        "rmse": summary["rmse"],
        "dice": summary["dice"],
        "iou": summary["iou"],
        "ece": summary["ece"],
        "threshold": tuned["threshold"],
        "dice_at_threshold": tuned["dice_mean"],
        "dice_global": fixed["dice_global"],
        "hd95_median": fixed["hd95_median"],
        "covid19_rmse": covid.get("rmse", float("nan")),
        "covid19_dice": covid.get("dice", float("nan")),
    }


def evaluate(
    model_path: str | Path,
    prepared_dir: str | Path,
    metrics_path: str | Path,
    per_image_csv: str | Path,
    curves_dir: str | Path,
    predictions_path: str | Path,
    params: EvaluateParams,
    details_path: str | Path | None = None,
) -> dict:
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
    per = pd.DataFrame(
        {
            "id": test["ids"],
            "class": test["classes"],
            "true_fraction": truth.mean((1, 2)),
            "pred_fraction": (prob >= tuned_threshold).mean((1, 2)),
            "rmse": np.sqrt(((prob - truth) ** 2).mean((1, 2), dtype=np.float64)),
        }
    )
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


def _train_prevalence(prepared_dir: str | Path) -> float:
    """Share of infected pixels in the training split (the constant-prior baseline's probability)."""
    path = Path(prepared_dir) / "train.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the train split is missing (the constant-prior baseline needs its prevalence)"
        )
    with np.load(path) as z:
        return float(z["masks"].mean(dtype=np.float64))


def _write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.6g")
    write_text(path, buf.getvalue())
