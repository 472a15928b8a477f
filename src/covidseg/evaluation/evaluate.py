"""Score the trained model on the test split: every metric of :mod:`covidseg.evaluation.metrics`, twice
(at the fixed threshold and at the one tuned on val), trivial baselines beside them.

Writes ``metrics_path`` (the headline numbers DVC compares, see :func:`headline`), ``details_path``
(every number, read by the report), ``per_image_csv`` (one row per test image), ``curves_dir``
(``pr.csv``, ``calibration.csv``, ``severity.csv``: per image, the true, predicted and oracle
per-lung infected shares and extent scores) and ``predictions_path`` (``.npz``: ids, uint8
probabilities ``round(255 p)`` of shape (N, S, S), the tuned ``threshold``, and with a lung head
``lungs``, the lung probabilities stored the same way) for the figures.
What each number means is written in ``docs/metrics.md``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from covidseg.atomic import atomic_path, details_path_for, write_json, write_text
from covidseg.data.arrays import load_split, lung_flags
from covidseg.device import choose_device, choose_precision
from covidseg.evaluation import agreement, metrics
from covidseg.evaluation.metrics import (
    EMPTY_TRUTH_RULE,
    baselines,
    calibration_table,
    class_breakdown,
    headline_key,
    pr_curve,
    threshold_metrics,
)
from covidseg.evaluation.severity_eval import HEADLINE as SEVERITY_HEADLINE
from covidseg.evaluation.severity_eval import evaluate_severity, median_lung_share
from covidseg.evaluation.severity_intervals import interval_columns, interval_summary
from covidseg.inference.calibration import Calibration, calibrated_outputs
from covidseg.masks.severity import LUNG_THRESHOLD
from covidseg.masks.share_interval import ShareInterval
from covidseg.model.checkpoint import load_model
from covidseg.params import EvaluateParams


def interval_metrics() -> tuple[str, ...]:
    """What the headline has a bootstrap interval of: each interval metric of the mask table, then RMSE."""
    return tuple(m.name for m in metrics.MASK_METRICS if m.interval) + ("rmse",)


def interval_keys() -> tuple[str, ...]:
    """The headline's interval keys: ``dice_ci95_low``, ``dice_ci95_high``, ..., ``rmse_ci95_high``."""
    return tuple(f"{name}_ci95_{side}" for name in interval_metrics() for side in ("low", "high"))


def _headline_stats(stat: str, block: dict) -> dict:
    """The table's headline numbers of one kind (see :data:`~covidseg.evaluation.metrics.HEADLINE_STATS`) from ``block``."""
    source = "mean" if stat == "tuned_mean" else stat
    return {headline_key(m, stat): block[f"{m.name}_{source}"] for m in metrics.MASK_METRICS if stat in m.headline}


def headline(summary: dict) -> dict:
    """The few test numbers declared as DVC metrics (what ``dvc exp show`` and ``dvc metrics diff`` list).

    ``rmse``, ``dice`` and ``iou`` keep the report's protocol (calibrated probabilities; per-image
    mean at threshold 0.5); ``*_at_threshold`` use the val-tuned threshold; ``covid19_*`` are the
    same over the COVID-19 images alone (equal to the headline when only COVID-19 is in the split);
    ``lung_dice``, ``share_*`` and ``extent_*`` are the model's severity against the truth (null for a
    model without a lung head). Everything else is in the details file.
    """
    fixed, tuned = summary["at_fixed_threshold"], summary["at_tuned_threshold"]
    covid = (summary.get("by_class") or {}).get("COVID-19") or {}
    model_severity = (summary.get("severity") or {}).get("model") or {}
    return {
        "n_images": summary["n_images"],
        "rmse": summary["rmse"],
        **_headline_stats("mean", fixed),
        "ece": summary["ece"],
        "threshold": tuned["threshold"],
        **_headline_stats("tuned_mean", tuned),
        **_headline_stats("global", fixed),
        **_headline_stats("median", fixed),
        **{k: (summary.get("intervals") or {}).get(k, float("nan")) for k in interval_keys()},
        **{k: model_severity.get(k, float("nan")) for k in SEVERITY_HEADLINE},
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
    prob, lung_prob, run = torch_predictions(model, meta, test["images"], device, params.precision)
    train_masks, train_lungs = _train_masks(prepared_dir)  # read once: prevalence and the severity baseline
    outputs = (metrics_path, per_image_csv, curves_dir, predictions_path, details_path)
    return score(prob, lung_prob, test, (train_masks, train_lungs), run, outputs, params, name=prepared_dir)


def torch_predictions(
    model, meta: dict, images: np.ndarray, device, precision: str
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(probabilities float32 (N, S, S), lung probabilities or None, the run record :func:`score` takes) of a
    loaded torch model on uint8 (N, 1, S, S) images, run exactly as calibrated on val."""
    calibration = Calibration.from_meta(meta)
    chosen = choose_precision(device, precision)
    prob, lung_prob = calibrated_outputs(model, images, device, chosen, calibration)
    run = {
        "threshold": calibration.threshold,
        "temperature": calibration.temperature,
        "flip_tta": calibration.flip_tta,
        "lung_gate": calibration.lung_gate,
        "evaluate_precision": chosen,
        "train_precision": str(meta.get("train_precision", "unknown")),  # older model files did not record it
        "share_interval": meta.get("share_interval"),  # fitted on val by training (None in older files)
    }
    return prob, lung_prob, run


def score(
    prob: np.ndarray,
    lung_prob: np.ndarray | None,
    test: dict,
    train: tuple[np.ndarray, np.ndarray],
    run: dict,
    outputs: tuple,
    params: EvaluateParams,
    name: str | Path = "",
) -> dict:
    """Score float32 (N, S, S) probabilities ``prob`` (and lung probabilities) against ``test`` (a loaded split)
    and write every output :func:`evaluate` writes; returns the summary.

    ``train``: bool (M, S, S) infection and lung masks for the baselines' prevalence and median share.
    ``run``: how the predictions were made (threshold None: ``params.threshold`` is the tuned one too;
    temperature, flip_tta, lung_gate, evaluate_precision, train_precision), copied into the summary.
    ``outputs``: (metrics_path, per_image_csv, curves_dir, predictions_path, details_path or None).
    """
    metrics_path, per_image_csv, curves_dir, predictions_path, details_path = outputs
    truth = test["masks"][:, 0].astype(bool)
    tuned_threshold = params.threshold if run["threshold"] is None else run["threshold"]

    fixed, per_fixed = threshold_metrics(prob, truth, params.threshold)
    tuned, per_tuned = threshold_metrics(prob, truth, tuned_threshold)
    count, psum, tsum = metrics.calibration_bins(prob, truth, params.calibration_bins)
    lungs = test["lungs"][:, 0].astype(bool) if "lungs" in test else None
    has_lung = lung_flags(test)
    train_masks, train_lungs = train
    _, severity, severity_per = _severity(
        prob >= tuned_threshold,
        lung_prob,
        truth,
        lungs,
        test["ids"],
        name,
        params,
        baseline_share=median_lung_share(train_masks, train_lungs),
        has_lung=has_lung,
    )
    interval = ShareInterval.from_meta(run.get("share_interval"))
    if interval is not None and lung_prob is not None and "pred_right_pct" in severity_per:
        columns = interval_columns(prob, lung_prob, tuned_threshold, interval, test["images"])
        severity_per = pd.concat([severity_per.reset_index(drop=True), columns], axis=1)
        severity["model"]["share_interval"] = interval_summary(severity_per, interval)
    summary = {
        "n_images": int(len(prob)),
        "rmse": metrics.rmse(prob, truth),
        **_headline_stats("mean", fixed),
        "brier": metrics.brier(prob, truth),
        "ece": metrics.expected_calibration_error(count, psum, tsum),
        "ece_bins": params.calibration_bins,
        "at_fixed_threshold": fixed,
        "at_tuned_threshold": tuned,
        "baselines": baselines(truth, lungs if has_lung.all() else None, float(train_masks.mean(dtype=np.float64))),
        "temperature": run["temperature"],
        "flip_tta": run["flip_tta"],
        "lung_gate": run["lung_gate"],
        "empty_truth_rule": EMPTY_TRUTH_RULE,
        "severity": severity,
        "evaluate_precision": run["evaluate_precision"],
        "train_precision": run["train_precision"],
    }
    summary["intervals"] = _intervals(prob, truth, per_fixed, params.bootstrap_resamples)
    per = pd.DataFrame(
        {
            "id": test["ids"],
            "class": test["classes"],
            "true_fraction": truth.mean((1, 2)),
            "pred_fraction": (prob >= tuned_threshold).mean((1, 2)),
            "rmse": np.sqrt(((prob - truth) ** 2).mean((1, 2), dtype=np.float64)),
        }
    )
    for label, table in (("fixed", per_fixed), ("tuned", per_tuned)):
        for col in table.columns:
            per[f"{col}_{label}"] = table[col].to_numpy()
    curves_dir = Path(curves_dir)
    summary["by_class"] = class_breakdown(per)
    _write_csv(per_image_csv, per)
    _write_csv(curves_dir / "pr.csv", pr_curve(prob, truth))
    _write_csv(curves_dir / "calibration.csv", calibration_table(count, psum, tsum))
    _write_csv(curves_dir / "severity.csv", severity_per)
    arrays = {"ids": test["ids"], "probs": np.round(prob * 255).astype(np.uint8), "threshold": tuned_threshold}
    if lung_prob is not None:
        arrays["lungs"] = np.round(lung_prob * 255).astype(np.uint8)
    with atomic_path(predictions_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_json(details_path or details_path_for(metrics_path), summary)
    write_json(metrics_path, headline(summary))
    return summary


def _intervals(prob: np.ndarray, truth: np.ndarray, per_fixed: pd.DataFrame, n_resamples: int) -> dict:
    """95 % percentile-bootstrap intervals (images resampled, seed 0) of :func:`interval_metrics`.

    Table metrics (dice, iou): mean of the per-image values at the fixed threshold (NaN images dropped, as in the
    mean); RMSE: root of the mean per-image squared error (every image has the same pixel count, so
    this is the pooled RMSE of the resampled images).
    """
    mse = ((prob - truth) ** 2).mean((1, 2), dtype=np.float64)
    out = {"resamples": n_resamples, "seed": 0, "level": 0.95}
    for key in interval_metrics()[:-1]:
        low, high = agreement.bootstrap_ci(per_fixed[key].to_numpy(float), np.mean, n_resamples=n_resamples)
        out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = low, high
    low, high = agreement.bootstrap_index_ci(len(mse), lambda idx: float(np.sqrt(mse[idx].mean())), n_resamples)
    out["rmse_ci95_low"], out["rmse_ci95_high"] = low, high
    return out


def _severity(
    pred_infection: np.ndarray,
    lung_prob: np.ndarray | None,
    truth: np.ndarray,
    true_lungs: np.ndarray | None,
    ids: np.ndarray,
    prepared_dir: str | Path,
    params: EvaluateParams,
    baseline_share: float,
    has_lung: np.ndarray | None = None,
) -> tuple[dict, dict, pd.DataFrame]:
    """The severity block (see :mod:`covidseg.evaluation.severity_eval`): headline, details, per-image table.

    ``baseline_share``: the constant per-lung share (percent) of the trivial baseline, the train split's median.
    ``has_lung``: bool (N,), the films with a true lung mask (None: all). Severity is scored on those only;
    the per-image table keeps every film, the others with empty values and ``severity_note`` saying why.
    """
    if true_lungs is None:
        raise ValueError(
            f"{prepared_dir}/test.npz has no lung masks: severity needs them (rerun `dvc repro preprocess`)"
        )
    keep = np.ones(len(ids), bool) if has_lung is None else has_lung
    films = pd.DataFrame({"image": list(ids)})
    if not keep.any():
        details = {"model": {"error": f"no scored film has a lung mask: {NO_LUNG_NOTE}"}, "films_with_lung_mask": 0}
        return dict.fromkeys(SEVERITY_HEADLINE, float("nan")), details, films.assign(severity_note=NO_LUNG_NOTE)
    pred_lungs = None if lung_prob is None else lung_prob[keep] >= LUNG_THRESHOLD
    headline_, details, per = evaluate_severity(
        pred_infection[keep],
        pred_lungs,
        truth[keep],
        true_lungs[keep],
        baseline_share,
        ids=list(np.asarray(ids)[keep]),
        n_resamples=params.bootstrap_resamples,
    )
    if keep.all():
        return headline_, details, per
    details["films_with_lung_mask"] = int(keep.sum())
    details["films_without_lung_mask"] = int((~keep).sum())
    per = films.merge(per, on="image", how="left")
    per["severity_note"] = np.where(keep, "", NO_LUNG_NOTE)
    return headline_, details, per


NO_LUNG_NOTE = "no lung mask in the source, so no true severity (never counted as 0)"


def _train_masks(prepared_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The train split's infection and lung masks, bool (N, S, S) each: the baselines' prevalence and median share."""
    path = Path(prepared_dir) / "train.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the train split is missing (the baselines need its infection and lung masks)")
    with np.load(path) as z:  # a film without a lung mask has empty lungs: no share, so no part in the median
        return z["masks"][:, 0].astype(bool), z["lungs"][:, 0].astype(bool)


def _write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.6g")
    write_text(path, buf.getvalue())
