"""Severity measured against the truth: the ``severity`` block of the test metrics.

The same measures (:func:`covidseg.masks.severity.severity_table`: infected share of each
lung in percent, extent score 0-8) are computed from predicted masks and from the true masks,
and compared. Three predictors are scored the same way:

    model      predicted infection inside the predicted lungs (what ``covidseg predict`` reports)
    oracle     predicted infection inside the *true* lungs: how much of the error the lungs add
    baseline   one constant share for every lung (the train split's median), extent from it

Policy: a lung that exists in the truth but that the predictor does not find (an empty predicted
lung after the left/right split) scores share 0 and extent 0 and is counted in ``lungs_missed``;
it is never dropped, which would flatter the score. Lungs absent from the truth are left out.
Intervals: percentile bootstrap over images (resampling images, fixed seed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidseg.evaluation import agreement
from covidseg.masks.counts import confusion, dice
from covidseg.masks.severity import extent_score, severity_table

HEADLINE = (
    "lung_dice",
    "share_mae",
    "share_mae_ci95_low",
    "share_mae_ci95_high",
    "share_pearson",
    "share_spearman",
    "extent_exact",
    "extent_within1",
    "extent_kappa",
)
MAX_EXTENT = 8


def _lung_shares(table: pd.DataFrame) -> np.ndarray:
    """float (N, 2) per-lung infected share in percent, columns (right, left); NaN for an empty lung."""
    return table[["right_pct", "left_pct"]].to_numpy(dtype=float)


def score_against_truth(pred: pd.DataFrame, truth: pd.DataFrame, seed: int = 0, n_resamples: int = 1000) -> dict:
    """Agreement of a predictor's severity table with the true one (both from :func:`severity_table`).

    Returns share_mae (percentage points, mean over images of the mean absolute error of their
    lungs) with its 95 % bootstrap interval, Pearson and Spearman of the per-lung shares, the
    Bland-Altman bias and limits (predicted minus true share), exact and within-one agreement and
    quadratic-weighted kappa of the 0-8 extent score, its confusion matrix (rows true, columns
    predicted), and how many true lungs the predictor missed; every measure but the confusion
    matrix and the counts also as a 95 % bootstrap interval (``*_ci95_low``/``*_ci95_high``, images
    resampled with both their lungs).
    """
    if len(pred) != len(truth):
        raise ValueError(f"severity tables differ in length: {len(pred)} predicted, {len(truth)} true")
    p, t = _lung_shares(pred), _lung_shares(truth)
    present = ~np.isnan(t)
    missed = present & np.isnan(p)
    p = np.where(np.isnan(p), 0.0, p)
    err = np.where(present, np.abs(p - t), np.nan)
    with np.errstate(invalid="ignore"):
        per_image = np.nanmean(np.where(present.any(1, keepdims=True), err, 0.0), axis=1)
    per_image[~present.any(1)] = np.nan
    low, high = agreement.bootstrap_ci(per_image, np.mean, n_resamples=n_resamples, seed=seed)
    ps, ts = p[present], t[present]
    ba = agreement.bland_altman(ps, ts)
    pred_extent = np.where(missed, 0, pred[["right_extent", "left_extent"]].to_numpy()).sum(1)
    true_extent = truth["extent_score"].to_numpy()
    ext = agreement.extent_agreement(pred_extent, true_extent)

    def lungs_of(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = present[idx]
        return p[idx][keep], t[idx][keep]

    cis = {}
    for key, stat in (
        ("share_pearson", lambda idx: agreement.pearson(*lungs_of(idx))),
        ("share_spearman", lambda idx: agreement.spearman(*lungs_of(idx))),
        ("extent_exact", lambda idx: float(np.mean(pred_extent[idx] == true_extent[idx]))),
        ("extent_within1", lambda idx: float(np.mean(np.abs(pred_extent[idx] - true_extent[idx]) <= 1))),
        ("extent_kappa", lambda idx: agreement.quadratic_weighted_kappa(pred_extent[idx], true_extent[idx])),
    ):
        cis[f"{key}_ci95_low"], cis[f"{key}_ci95_high"] = agreement.bootstrap_index_ci(len(t), stat, n_resamples, seed)
    return {
        **cis,
        "share_mae": float(np.nanmean(per_image)) if np.isfinite(per_image).any() else float("nan"),
        "share_mae_ci95_low": low,
        "share_mae_ci95_high": high,
        "share_pearson": agreement.pearson(ps, ts),
        "share_spearman": agreement.spearman(ps, ts),
        "share_bias": ba.bias,
        "share_loa_low": ba.lower,
        "share_loa_high": ba.upper,
        "extent_exact": ext["exact"],
        "extent_within1": ext["within_1"],
        "extent_kappa": ext["kappa"],
        "extent_mae": float(np.mean(np.abs(pred_extent - true_extent))) if len(true_extent) else float("nan"),
        "extent_confusion": agreement.confusion_matrix(pred_extent, true_extent, MAX_EXTENT).tolist(),
        "share_error_by_true_band": share_error_by_band(ps, ts),
        "lungs": int(present.sum()),
        "lungs_missed": int(missed.sum()),
        "infected_outside_lungs_pct_mean": float(pred["infected_outside_lungs_pct"].mean()),
    }


TRUE_SHARE_BANDS = (0.0, 25.0, 50.0, 75.0, 100.0)  # percent: the extent grades' edges


def share_error_by_band(pred: np.ndarray, true: np.ndarray) -> list[dict]:
    """Per true-share band (``0-25`` ... ``75-100``, the last one closed): lungs, MAE and bias (predicted minus
    true, points) of per-lung shares ``pred``, ``true`` float (L,) in percent; MAE and bias None for an empty band."""
    out = []
    for k, (lo, hi) in enumerate(zip(TRUE_SHARE_BANDS[:-1], TRUE_SHARE_BANDS[1:])):
        inside = (true >= lo) & ((true < hi) if k < len(TRUE_SHARE_BANDS) - 2 else (true <= hi))
        diff = pred[inside] - true[inside]
        out.append(
            {
                "band": f"{lo:g}-{hi:g}",
                "lungs": int(inside.sum()),
                "mae": float(np.abs(diff).mean()) if diff.size else None,
                "bias": float(diff.mean()) if diff.size else None,
            }
        )
    return out


def constant_share_table(share_pct: float, n: int) -> pd.DataFrame:
    """The baseline's severity table: every lung of ``n`` images at ``share_pct`` percent."""
    lung_extent = int(extent_score(share_pct))
    return pd.DataFrame(
        {
            "right_pct": [share_pct] * n,
            "left_pct": [share_pct] * n,
            "lungs_pct": [share_pct] * n,
            "right_extent": [lung_extent] * n,
            "left_extent": [lung_extent] * n,
            "extent_score": [2 * lung_extent] * n,
            "infected_outside_lungs_pct": [0.0] * n,
        }
    )


def median_lung_share(infection: np.ndarray, lungs: np.ndarray) -> float:
    """Median per-lung infected share (percent) of true bool masks (N, H, W), e.g. the train split's."""
    shares = _lung_shares(severity_table(infection, lungs))
    shares = shares[~np.isnan(shares)]
    return float(np.median(shares)) if shares.size else 0.0


def lung_dice(pred_lungs: np.ndarray, true_lungs: np.ndarray) -> float:
    """Mean per-image Dice of predicted against true lung masks, bool (N, H, W) (empty-truth rule of metrics)."""
    d = dice(confusion(pred_lungs, true_lungs))
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


def evaluate_severity(
    pred_infection: np.ndarray,
    pred_lungs: np.ndarray | None,
    true_infection: np.ndarray,
    true_lungs: np.ndarray,
    baseline_share: float,
    ids: list[str] | None = None,
    seed: int = 0,
    n_resamples: int = 1000,
) -> tuple[dict, dict, pd.DataFrame]:
    """Score severity on a split; all masks bool (N, H, W), ``pred_lungs`` None for a model without a lung head.

    Returns (headline: the :data:`HEADLINE` numbers of the model, NaN without a lung head;
    details: ``model``, ``oracle_true_lungs``, ``baseline_constant_share`` blocks and the truth's
    distribution; per-image table: true, model and oracle shares and extents).
    """
    truth = severity_table(true_infection, true_lungs, ids)
    oracle = severity_table(pred_infection, true_lungs)
    details: dict = {
        "policy": "a true lung the predictor does not find scores share 0 and extent 0 (counted in lungs_missed); "
        "shares in percent of the lung's pixels, errors in percentage points; intervals: bootstrap "
        f"over images, {n_resamples} resamples, seed {seed}",
        "truth": {
            "share_mean": float(np.nanmean(_lung_shares(truth))),
            "share_median": float(np.nanmedian(_lung_shares(truth))),
            "extent_counts": np.bincount(truth["extent_score"], minlength=MAX_EXTENT + 1).tolist(),
        },
        "oracle_true_lungs": score_against_truth(oracle, truth, seed, n_resamples),
        "baseline_constant_share": {
            "share_pct": baseline_share,
            **score_against_truth(constant_share_table(baseline_share, len(truth)), truth, seed, n_resamples),
        },
    }
    per = truth.rename(columns={c: f"true_{c}" for c in truth.columns if c != "image"})
    for c in ("right_pct", "left_pct", "extent_score"):
        per[f"oracle_{c}"] = oracle[c].to_numpy()
    if pred_lungs is None:
        details["model"] = {
            "error": "the model has no lung head, so it cannot measure severity; retrain with train.lung_aux_weight > 0"
        }
        headline = dict.fromkeys(HEADLINE, float("nan"))
        return headline, details, per
    model = severity_table(pred_infection, pred_lungs)
    per_image_lung_dice = dice(confusion(pred_lungs, true_lungs))
    low, high = agreement.bootstrap_ci(per_image_lung_dice, np.mean, n_resamples=n_resamples, seed=seed)
    details["model"] = {
        "lung_dice": lung_dice(pred_lungs, true_lungs),
        "lung_dice_ci95_low": low,
        "lung_dice_ci95_high": high,
        **score_against_truth(model, truth, seed, n_resamples),
    }
    for c in ("right_pct", "left_pct", "extent_score", "infected_outside_lungs_pct"):
        per[f"pred_{c}"] = model[c].to_numpy()
    headline = {k: details["model"][k] for k in HEADLINE}
    return headline, details, per
