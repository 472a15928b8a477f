"""Infection severity per lung from masks: lung split, infected shares, extent score.

Shapes: masks are boolean arrays (H, W), or batches (N, H, W) where stated. Shares are
percentages in [0, 100] of pixels (no physical units: the masks carry no pixel spacing).

Side convention: radiological (PA/AP) view, the patient faces the viewer, so the lung on
the IMAGE'S LEFT (small column indices) is the PATIENT'S RIGHT lung. ``right``/``left``
always name the patient's side.

Extent score: the geographic-extent score of Wong HYF et al., "Frequency and distribution
of chest radiographic findings in COVID-19 positive patients", Radiology 2020;296:E72-E78,
adapted from the RALE score of Warren MA et al., "Severity scoring of lung oedema on the
chest radiograph is associated with clinical outcomes in ARDS", Thorax 2018;73:840-846.
Each lung scores 0 (no involvement), 1 (< 25 %), 2 (25-50 %), 3 (50-75 %) or 4 (>= 75 %)
of its area involved; the image score is the sum of both lungs, 0-8. Here the involved
share is measured on masks rather than read by a radiologist.

This module depends only on numpy, scipy and pandas.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import ndimage

# 8-connectivity: lung pixels touching diagonally belong to one component.
_EIGHT = np.ones((3, 3), dtype=bool)
EXTENT_EDGES = (25.0, 50.0, 75.0)  # share (%) at which the per-lung score steps up to 2, 3, 4


LUNG_THRESHOLD = 0.5  # a pixel is lung when the lung head's probability is at least this (not tuned)


def _as_mask(a: np.ndarray, name: str, ndim: int) -> np.ndarray:
    """``a`` as a bool array of ``ndim`` dimensions; 0/1 numbers are accepted, other values refused."""
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D mask, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be a boolean mask (or hold only 0 and 1), got values other than 0/1")
        a = a.astype(bool)
    return a


MIN_LUNG_FRACTION = 0.02  # of the film's pixels: a smaller region is not a lung (a blob, a fragment)


def split_lungs(
    lungs: np.ndarray, min_fraction: float = 0.1, valley: float = 0.5, min_lung: float = MIN_LUNG_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Split a lung mask (H, W) into the patient's ``right`` and ``left`` lung, bool (H, W) each.

    ``right`` is the lung on the IMAGE'S LEFT (radiological view). ``right & left`` is empty and
    ``right | left`` lies within ``lungs``: a lung is a region of plausible size on its own side, and
    a side with none stays empty instead of being invented from the other lung's pixels.

    Method:
    1. Connected components (8-connectivity). A component is *substantial* when it holds at
       least ``min_fraction`` of the largest component's pixels; smaller ones are blobs.
    2. Two substantial largest components whose column ranges overlap by less than half the
       narrower one are the two lungs, told apart by centroid column. Any other component
       goes, whole, to the side of the midpoint between the two lung centroids.
    3. Otherwise (touching lungs, one lung only) the column profile (lung pixels per column)
       of the substantial components is searched for a valley in the middle third of their
       horizontal extent: a column whose count is at most ``valley`` times the smaller of the
       peaks on its two sides. If found, the lungs are cut at that column (columns before it
       are ``right``), and blobs go by their centroid column. If not, the mask is one lung,
       and all pixels, blobs included, go to it.
    4. Each side is then checked against the image's centre column (W - 1) / 2. Two parts on one
       side of it are one lung that a valley cut (step 3) split: they are merged; or, when they
       are separate regions (step 2: e.g. a film cut off at the centre, leaving a piece of the
       other lung beside the whole one), the larger is the lung and the other is not one (its
       pixels are in neither lung). Of the dev data's 2,104 true lung masks one has both lung
       centroids on one side (a film far off centre): it reads as one lung, a refusal, never a
       wrong number. Then a part under ``min_lung`` of the film's pixels is not a lung and is
       dropped, and a lung left alone takes the side its centroid is on.
    An empty mask gives two empty masks.
    """
    lungs = _as_mask(lungs, "lungs", 2)
    right, left, cut = _split_candidates(lungs, min_fraction, valley)
    centre = (lungs.shape[1] - 1) / 2
    if right.any() and left.any():
        sides = {_centroid_column(right) < centre, _centroid_column(left) < centre}
        if len(sides) == 1:  # both on one side of the centre
            keep, other = (right, left) if sides == {True} else (left, right)
            if cut:  # one lung that a valley cut in two
                keep |= right | left
            elif other.sum() > keep.sum():  # two separate regions: the larger is the lung, the other is not
                keep[:] = other
            other[:] = False
    for part in (right, left):
        if part.any() and part.sum() < min_lung * lungs.size:
            part[:] = False
    for part, other, on_side in ((right, left, lambda c: c < centre), (left, right, lambda c: c >= centre)):
        if part.any() and not other.any() and not on_side(_centroid_column(part)):
            other |= part
            part[:] = False
    return right, left


def _centroid_column(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def _split_candidates(lungs: np.ndarray, min_fraction: float, valley: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """Steps 1-3 of :func:`split_lungs`: every lung pixel to one side, before the side and size checks; and
    whether the split is a valley cut (step 3), not two separate components (step 2)."""
    right, left = np.zeros_like(lungs), np.zeros_like(lungs)
    if not lungs.any():
        return right, left, False
    labels, n = ndimage.label(lungs, structure=_EIGHT)
    ids = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(lungs, labels, ids)
    cols = np.array([c for _, c in ndimage.center_of_mass(lungs, labels, ids)]).reshape(-1)
    order = np.argsort(-sizes, kind="stable")
    substantial = sizes >= min_fraction * sizes[order[0]]

    if n >= 2 and substantial[order[1]] and not _same_columns(labels, ids[order[0]], ids[order[1]]):
        split = (cols[order[0]] + cols[order[1]]) / 2  # the lung with the smaller centroid column is < split
        for i in range(n):
            (right if cols[i] < split else left)[labels == ids[i]] = True
        return right, left, False

    core = np.isin(labels, ids[substantial])
    cut = _valley_column(core.sum(axis=0), valley)
    if cut is None:
        centroid = np.nonzero(core)[1].mean()
        (right if centroid < (lungs.shape[1] - 1) / 2 else left)[lungs] = True
        return right, left, False
    columns = np.arange(lungs.shape[1])
    right[core & (columns < cut)] = True
    left[core & (columns >= cut)] = True
    for i in np.flatnonzero(~substantial):
        (right if cols[i] < cut else left)[labels == ids[i]] = True
    return right, left, True


def _same_columns(labels: np.ndarray, a: int, b: int) -> bool:
    """Whether components ``a`` and ``b`` share at least half the narrower one's columns (one lung in pieces)."""
    ca, cb = np.flatnonzero((labels == a).any(axis=0)), np.flatnonzero((labels == b).any(axis=0))
    overlap = min(ca[-1], cb[-1]) - max(ca[0], cb[0]) + 1
    return overlap >= 0.5 * min(len(ca), len(cb))


def _valley_column(profile: np.ndarray, valley: float) -> int | None:
    """Column of the deepest valley in the middle third of the profile's extent, or None if not deep enough.

    Among equally deep columns the one nearest the extent's centre wins (a gap of zeros is
    cut in its middle).
    """
    occupied = np.flatnonzero(profile)
    c0, c1 = occupied[0], occupied[-1]
    width = c1 - c0 + 1
    lo, hi = c0 + width // 3, c0 + (2 * width) // 3
    if hi <= lo:
        return None
    middle = profile[lo : hi + 1]
    candidates = lo + np.flatnonzero(middle == middle.min())
    m = int(candidates[np.argmin(np.abs(candidates - (c0 + c1) / 2))])
    before, after = profile[c0:m], profile[m + 1 : c1 + 1]
    if before.size == 0 or after.size == 0:
        return None
    return m if profile[m] <= valley * min(before.max(), after.max()) else None


def lung_shares(infection: np.ndarray, right: np.ndarray, left: np.ndarray) -> dict[str, float]:
    """Infected share of each lung, in percent, from bool masks (H, W).

    Returns ``right_pct``, ``left_pct``, ``lungs_pct``: infected pixels inside that lung
    (both lungs for ``lungs_pct``) / that lung's pixels * 100, NaN when the lung is empty;
    and ``infected_outside_lungs_pct``: infected pixels outside ``right | left`` / all
    infected pixels * 100, 0 when nothing is infected. Infection outside the lungs is
    reported there, never dropped silently.
    """
    infection = _as_mask(infection, "infection", 2)
    right, left = _as_mask(right, "right", 2), _as_mask(left, "left", 2)
    if not infection.shape == right.shape == left.shape:
        raise ValueError(f"infection {infection.shape}, right {right.shape} and left {left.shape} must have one shape")
    if (right & left).any():
        raise ValueError(f"right and left lung masks overlap on {int((right & left).sum())} pixels")
    lungs = right | left
    infected = int(infection.sum())
    outside = int((infection & ~lungs).sum())
    return {
        "right_pct": _pct(infection, right),
        "left_pct": _pct(infection, left),
        "lungs_pct": _pct(infection, lungs),
        "infected_outside_lungs_pct": 100.0 * outside / infected if infected else 0.0,
    }


def _pct(infection: np.ndarray, region: np.ndarray) -> float:
    """Infected pixels in ``region`` / region pixels * 100; NaN for an empty region."""
    n = int(region.sum())
    return 100.0 * int((infection & region).sum()) / n if n else float("nan")


def extent_score(share_pct: ArrayLike) -> np.ndarray | int:
    """Per-lung extent score 0-4 of an infected share in percent (scalar or array, vectorised).

    0 when the share is exactly 0, 1 for 0 < s < 25, 2 for 25 <= s < 50, 3 for 50 <= s < 75,
    4 for s >= 75. A NaN share (no lung pixel found) scores 0: there is no lung area to
    involve; the NaN share itself stays in the table so a missing lung remains visible.
    Returns int64 of the input's shape (a Python int for a scalar). Shares outside
    [0, 100] raise ValueError.
    """
    s = np.asarray(share_pct, dtype=float)
    bad = ~np.isnan(s) & ((s < 0) | (s > 100))
    if bad.any():
        raise ValueError(f"share_pct must lie in [0, 100] (percent), got {s[bad].reshape(-1)[0]!r}")
    score = np.where(np.isnan(s) | (s == 0), 0, 1 + np.searchsorted(EXTENT_EDGES, np.nan_to_num(s), side="right"))
    score = score.astype(np.int64)
    return int(score) if score.ndim == 0 else score


SEVERITY_KEYS = (
    "right_pct",
    "left_pct",
    "lungs_pct",
    "right_extent",
    "left_extent",
    "extent_score",
    "infected_outside_lungs_pct",
)


def image_severity(infection: np.ndarray, lungs: np.ndarray, counts: bool = False) -> dict[str, float]:
    """The :data:`SEVERITY_KEYS` of one image from bool (H, W) infection and lung masks.

    The lungs are split by :func:`split_lungs`; shares as :func:`lung_shares` (percent, NaN for a
    lung not found), extent scores by :func:`extent_score` (0-4 per lung, their sum 0-8). With
    ``counts``, also the :data:`COUNT_KEYS`: pixels of each lung and infected pixels inside it.
    """
    return split_severity(_as_mask(infection, "infection", 2), *split_lungs(lungs), counts=counts)


def split_severity(
    infection: np.ndarray, right_lung: np.ndarray, left_lung: np.ndarray, counts: bool = False
) -> dict[str, float]:
    """:func:`image_severity` from lungs already split (bool (H, W) each)."""
    shares = lung_shares(infection, right_lung, left_lung)
    right, left = extent_score(shares["right_pct"]), extent_score(shares["left_pct"])
    values = {**shares, "right_extent": right, "left_extent": left, "extent_score": right + left}
    if counts:
        values |= {
            "right_lung_px": int(right_lung.sum()),
            "left_lung_px": int(left_lung.sum()),
            "right_infected_px": int((infection & right_lung).sum()),
            "left_infected_px": int((infection & left_lung).sum()),
        }
    return values


COUNT_KEYS = ("right_lung_px", "left_lung_px", "right_infected_px", "left_infected_px")


def severity_table(
    infection_masks: np.ndarray, lung_masks: np.ndarray, ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per image of bool batches (N, H, W): shares (%), per-lung and image extent scores.

    Columns: ``right_pct``, ``left_pct``, ``lungs_pct`` (see :func:`lung_shares`),
    ``right_extent``, ``left_extent`` (0-4, :func:`extent_score`), ``extent_score``
    (their sum, 0-8) and ``infected_outside_lungs_pct``. With ``ids`` (N names) a first
    column ``image`` holds them. Lungs are split by :func:`split_lungs`.
    """
    infection_masks = _as_mask(infection_masks, "infection_masks", 3)
    lung_masks = _as_mask(lung_masks, "lung_masks", 3)
    if infection_masks.shape != lung_masks.shape:
        raise ValueError(
            f"infection_masks {infection_masks.shape} and lung_masks {lung_masks.shape} must have one shape"
        )
    if ids is not None and len(ids) != len(lung_masks):
        raise ValueError(f"ids has {len(ids)} names for {len(lung_masks)} images")
    rows = [image_severity(infection, lungs) for infection, lungs in zip(infection_masks, lung_masks)]
    table = pd.DataFrame(rows, columns=SEVERITY_KEYS)
    table[["right_extent", "left_extent", "extent_score"]] = table[
        ["right_extent", "left_extent", "extent_score"]
    ].astype(np.int64)
    if ids is not None:
        table.insert(0, "image", list(ids))
    return table
