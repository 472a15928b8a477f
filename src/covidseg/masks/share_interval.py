"""A 95 % interval on each lung's infected share, and the reasons a reader should check a film.

The interval is a normalised split-conformal error model fitted on val (Papadopoulos et al., "Inductive
confidence machines for regression", ECML 2002; Lei et al., "Distribution-free predictive inference for
regression", JASA 2018). Each lung gets a *spread*: how much its infected share moves between the
thresholds 0.25 and 0.75 on the calibrated probabilities (percentage points), a per-film measure of how
unsure the infection mask is at its edges. Each val lung that both the truth and the model find gives
a score ``|true share - predicted share| / (spread + OFFSET)``; ``q`` is the score of rank
``ceil((n + 1) * 0.95)`` of the ``n`` val lungs. A new lung's interval is
``predicted share -+ q * (spread + OFFSET)``, clipped to [0, 100]: at least 95 % coverage when val and
new films are exchangeable, wider where the mask is unsure. The evaluate stage measures the coverage
on test.

Why not flip or ensemble disagreement: a from-scratch model's share error is mostly bias its flipped
twin shares, so disagreement alone gives intervals far too narrow; the val residuals calibrate the
spread to the error actually made. On the dev data (the real preset's model) the spread tracks the
error (Pearson 0.48 on val) and makes the intervals a quarter narrower than one error band for all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from covidseg.masks.plausibility import severity_refusals
from covidseg.masks.severity import LUNG_THRESHOLD, extent_score, lung_shares, severity_table, split_lungs

LEVEL = 0.95
OFFSET = 5.0  # percentage points added to every spread, so a lung with a crisp mask still gets an interval
SPREAD_THRESHOLDS = (0.25, 0.75)
MIN_LUNGS = 30  # fewer val lungs with both a true and a predicted share: no interval is fitted
# A film is flagged for review when a lung's interval spans this many extent-grade steps: all of them, from
# grade 0 (share 0) to grade 4 (75 % or more). Chosen on the reference model's val films: with 2 or 3 steps
# 79-93 % of the films were flagged, too many to single out the unsure ones.
WIDE_GRADES = 4
OUTSIDE_LUNGS_PCT = 50.0  # ... when more of the predicted infection than this lies outside the lungs
# ... when more of the predicted lung area than this is uncertain (lung probability in [0.25, 0.75)); the
# reference model's val films have a median of 0.10 and a 90th percentile of 0.19.
UNSURE_LUNG_SHARE = 0.30
UNSURE_LOW, UNSURE_HIGH = 0.25, 0.75
SIDES = ("right", "left")  # the patient's (image left = patient's right)


@dataclass(frozen=True)
class ShareInterval:
    """``q``: the val quantile of the normalised error; ``lungs``: how many val lungs set it."""

    q: float
    lungs: int
    level: float = LEVEL
    offset: float = OFFSET

    def bounds(self, pred: np.ndarray | float, spread: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) in percent, clipped to [0, 100], for predicted shares and their spreads (NaN stays NaN)."""
        pred, spread = np.asarray(pred, np.float64), np.asarray(spread, np.float64)
        half = self.q * (spread + self.offset)
        return np.clip(pred - half, 0.0, 100.0), np.clip(pred + half, 0.0, 100.0)

    def to_meta(self) -> dict:
        """Plain JSON values, as the model file and the ONNX metadata store them."""
        return {
            "method": "normalised split conformal on val: share -+ q * (spread + offset)",
            "q": self.q,
            "lungs": self.lungs,
            "level": self.level,
            "offset": self.offset,
            "spread_thresholds": list(SPREAD_THRESHOLDS),
        }

    @classmethod
    def from_meta(cls, meta: dict | None) -> ShareInterval | None:
        """The interval a model file records (None when it records none); ValueError for a malformed one."""
        if not meta:
            return None
        try:
            q, lungs, level, offset = float(meta["q"]), int(meta["lungs"]), float(meta["level"]), float(meta["offset"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"share_interval: expected q, lungs, level and offset, got {meta!r:.200}") from None
        if not (q >= 0 and math.isfinite(q) and 0 < level < 1 and offset >= 0):
            raise ValueError(f"share_interval: out of range {meta!r:.200}")
        return cls(q, lungs, level, offset)


def lung_spreads(prob: np.ndarray, right: np.ndarray, left: np.ndarray) -> tuple[float, float]:
    """(right, left) spread of one film: |share at p >= 0.25 - share at p >= 0.75|, points; NaN for an absent lung.

    prob: float (H, W) calibrated infection probabilities; right, left: bool (H, W) lungs (split_lungs).
    """
    low, high = (lung_shares(prob >= t, right, left) for t in SPREAD_THRESHOLDS)
    return abs(low["right_pct"] - high["right_pct"]), abs(low["left_pct"] - high["left_pct"])


def spread_table(prob: np.ndarray, lung_prob: np.ndarray, lung_threshold: float = 0.5) -> np.ndarray:
    """float (N, 2) right and left spreads of a batch: prob, lung_prob float (N, H, W)."""
    return np.array([lung_spreads(p, *split_lungs(lp >= lung_threshold)) for p, lp in zip(prob, lung_prob)])


def fit_share_interval(
    pred: np.ndarray, true: np.ndarray, spread: np.ndarray, level: float = LEVEL, offset: float = OFFSET
) -> ShareInterval | None:
    """The interval model from per-lung predicted and true shares and spreads (percent, one shape, NaN where a
    lung is absent); None when fewer than :data:`MIN_LUNGS` lungs have both a true and a predicted share."""
    pred, true, spread = (np.ravel(np.asarray(a, np.float64)) for a in (pred, true, spread))
    both = ~np.isnan(pred) & ~np.isnan(true)
    n = int(both.sum())
    if n < MIN_LUNGS:
        return None
    scores = np.sort(np.abs(true[both] - pred[both]) / (spread[both] + offset))
    rank = math.ceil((n + 1) * level)
    q = float(scores[rank - 1]) if rank <= n else float("inf")
    return ShareInterval(q, n, level, offset)


def fit_from_predictions(
    prob: np.ndarray,
    lung_prob: np.ndarray,
    threshold: float,
    true_infection: np.ndarray,
    true_lungs: np.ndarray,
    has_lung: np.ndarray | None = None,
) -> ShareInterval | None:
    """:func:`fit_share_interval` from a split's calibrated outputs and truth.

    prob, lung_prob: float (N, S, S) infection and lung probabilities; true_infection, true_lungs: bool
    (N, S, S); has_lung: bool (N,), the films whose true lungs are known (None: all).
    """
    pred = severity_table(prob >= threshold, lung_prob >= LUNG_THRESHOLD)[["right_pct", "left_pct"]].to_numpy(float)
    true = severity_table(true_infection, true_lungs)[["right_pct", "left_pct"]].to_numpy(float)
    if has_lung is not None:
        true = np.where(np.asarray(has_lung, bool)[:, None], true, np.nan)
    return fit_share_interval(pred, true, spread_table(prob, lung_prob))


def grades_spanned(low: float | None, high: float | None) -> int:
    """How many extent-grade steps (0-4 per lung) an interval [low, high] in percent crosses; 0 without one."""
    if low is None or high is None or low != low or high != high:
        return 0
    return int(extent_score(high)) - int(extent_score(low))


def unsure_lung_share(lung_prob: np.ndarray) -> float:
    """Share of the predicted lung area (probability >= 0.5) whose lung probability lies in [0.25, 0.75)."""
    lung = lung_prob >= 0.5
    if not lung.any():
        return 0.0
    unsure = (lung_prob >= UNSURE_LOW) & (lung_prob < UNSURE_HIGH)
    return float(unsure.sum() / lung.sum())


def review_reasons(status: str, outside_pct: float | None, spans: tuple[int, int], unsure: float | None) -> list[str]:
    """Why a reader should check a film (empty: no reason). ``status``: predict's ``severity_status``
    (its codes other than ok: the film gives no or a partial severity); ``outside_pct``: share of the
    infected pixels outside the lungs; ``spans``: :func:`grades_spanned` of each lung; ``unsure``:
    :func:`unsure_lung_share`."""
    reasons = [c for c in status.split("+") if c and c != "ok"]
    if max(spans) >= WIDE_GRADES:
        reasons.append("interval_spans_grades")
    if outside_pct is not None and outside_pct > OUTSIDE_LUNGS_PCT and "outside" not in reasons:
        reasons.append("outside_lungs")
    if unsure is not None and unsure > UNSURE_LUNG_SHARE:
        reasons.append("unsure_lung_head")
    return reasons


def film_intervals(
    prob: np.ndarray,
    lung_prob: np.ndarray,
    threshold: float,
    interval: ShareInterval | None,
    grey: np.ndarray | None = None,
    status: str | None = None,
    lungs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """One film's interval columns and review reasons.

    prob, lung_prob: float (H, W) calibrated infection and lung probabilities; grey: uint8 (H, W) for the
    plausibility checks of the grey levels (None: masks alone); ``status``: the film's severity status when
    the caller has it (``covidseg predict``'s, which also knows the view), else it is found here; ``lungs``:
    the (right, left) split of the predicted lungs when the caller has it, else split here. Returns
    ``{side}_pct``, ``{side}_pct_low``, ``{side}_pct_high`` (percent; NaN for a lung not found, a film
    refused or no ``interval``) and ``review`` (reasons joined by ``+``, "" for none).
    """
    infection = prob >= threshold
    right, left = split_lungs(lung_prob >= LUNG_THRESHOLD) if lungs is None else lungs
    spreads = lung_spreads(prob, right, left) if interval is not None else (np.nan, np.nan)
    if status is None:
        status = "+".join(c for c, _ in severity_refusals(grey, infection, right, left)) or "ok"
    codes = [c for c in status.split("+") if c != "ok"]
    out: dict = {}
    spans = []
    for side, lung, spread in zip(SIDES, (right, left), spreads):
        share = 100.0 * float((infection & lung).sum()) / lung.sum() if lung.any() else float("nan")
        refused = bool(codes) and codes != ["one_lung"]
        low, high = (np.nan, np.nan) if refused or interval is None else interval.bounds(share, spread)
        out[f"{side}_pct"], out[f"{side}_pct_low"], out[f"{side}_pct_high"] = share, float(low), float(high)
        spans.append(grades_spanned(float(low), float(high)))
    lungs = right | left
    outside = 100.0 * float((infection & ~lungs).sum()) / infection.sum() if infection.any() else 0.0
    reasons = review_reasons(status, outside, (spans[0], spans[1]), unsure_lung_share(lung_prob))
    out["review"] = "+".join(reasons)
    return out
