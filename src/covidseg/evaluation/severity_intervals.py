"""The per-lung share intervals and review flags on a scored split: their columns in the per-image severity
table, the coverage of the true shares and the share error of flagged against other films."""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidseg.masks.share_interval import SIDES, ShareInterval, film_intervals


def interval_columns(
    prob: np.ndarray,
    lung_prob: np.ndarray,
    threshold: float,
    interval: ShareInterval,
    images: np.ndarray | None = None,
) -> pd.DataFrame:
    """:func:`film_intervals` of a batch, prob and lung_prob float (N, H, W), images uint8 (N, 1, H, W) or None:
    columns ``pred_{side}_pct_low``, ``pred_{side}_pct_high`` and ``review``, one row per film."""
    rows = [
        film_intervals(p, lp, threshold, interval, None if images is None else images[k, 0])
        for k, (p, lp) in enumerate(zip(prob, lung_prob))
    ]
    table = pd.DataFrame(rows)
    return table.rename(columns={f"{s}_pct_{b}": f"pred_{s}_pct_{b}" for s in SIDES for b in ("low", "high")})[
        [f"pred_{s}_pct_{b}" for s in SIDES for b in ("low", "high")] + ["review"]
    ]


def film_share_error(per: pd.DataFrame) -> np.ndarray:
    """float (N,): each film's mean over its lungs of |pred - true| infected share (points), from the severity
    table's ``true_{side}_pct`` and ``pred_{side}_pct``; a lung missing either is left out, and a film with
    no lung left is NaN (without nanmean's warning)."""
    true = per[[f"true_{s}_pct" for s in SIDES]].to_numpy(float)
    pred = per[[f"pred_{s}_pct" for s in SIDES]].to_numpy(float)
    return lung_share_error(pred, true)


def lung_share_error(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """float (N,): the mean over each film's lungs of |pred - true| for shares (N, L) in points, NaN where
    undefined; a lung NaN on either side is left out, and a film with no lung left is NaN (no warning)."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    both = ~np.isnan(true) & ~np.isnan(pred)
    counted = both.sum(axis=1)
    return np.where(both, np.abs(pred - true), 0.0).sum(axis=1) / np.where(counted > 0, counted, np.nan)


def interval_summary(per: pd.DataFrame, interval: ShareInterval) -> dict:
    """Coverage and width of the intervals over the lungs with a true and a predicted share, and the per-film
    share error (mean over its lungs, points) of the films flagged for review against the others.

    ``per``: the severity table with ``true_{side}_pct``, ``pred_{side}_pct`` and the interval columns.
    """
    true = per[[f"true_{s}_pct" for s in SIDES]].to_numpy(float)
    low = per[[f"pred_{s}_pct_low" for s in SIDES]].to_numpy(float)
    high = per[[f"pred_{s}_pct_high" for s in SIDES]].to_numpy(float)
    scored = ~np.isnan(true) & ~np.isnan(low)
    inside = (true >= low) & (true <= high)
    film_error = film_share_error(per)
    flagged = per["review"].fillna("").astype(str).to_numpy() != ""

    def mae(rows: np.ndarray) -> float | None:
        e = film_error[rows]
        e = e[~np.isnan(e)]
        return float(e.mean()) if e.size else None

    return {
        **interval.to_meta(),
        "coverage": float(inside[scored].mean()) if scored.any() else None,
        "lungs_scored": int(scored.sum()),
        "mean_width": float((high - low)[scored].mean()) if scored.any() else None,
        "flagged_films": int(flagged.sum()),
        "share_mae_flagged": mae(flagged),
        "share_mae_others": mae(~flagged),
        "review_reasons": {
            reason: int(sum(reason in r.split("+") for r in per["review"].fillna("").astype(str)))
            for reason in sorted({x for r in per["review"].fillna("").astype(str) for x in r.split("+") if x})
        },
    }
