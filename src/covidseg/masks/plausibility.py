"""Whether a film can give a severity at all, and if not, why: never a silent number where it cannot.

Severity (per-lung infected share, extent score) assumes a frontal chest film, displayed as the
training films were (bone bright), with both lungs found and of plausible size, and the predicted
infection inside them. :func:`severity_refusals` checks each assumption from what the film's header
says, its grey levels and the predicted masks, and returns the reasons it fails, each a
(code, message) pair. Codes (see :data:`REASONS`):

- ``lateral``: the header's ViewPosition is a lateral view (per-lung shares need a frontal film);
- ``not_chest``: the header's BodyPartExamined names another body part;
- ``low_range``: almost no dynamic range after decoding (blank, or decoded at the wrong scale), or
  nearly black: the 99th percentile grey level under :data:`DARK_LEVEL` (e.g. a detector's 10 bits
  stored as 12: the film reads as a quarter of the grey scale). 1 of the dev data's 2,104 films is
  that dark;
- ``inverted``: the film looks like a negative: the central strip (spine, mediastinum) darker than
  the lung fields beside it by more than :data:`INVERTED_MARGIN` grey levels. On the dev data's
  2,104 COVID-19, Non-COVID and Normal films this flags 2 correctly displayed ones (bilateral
  whiteout makes the lung fields bright) and 52 % of their inverted copies: a cue, not a proof;
- ``no_lungs``: no lung found; ``one_lung``: only one (a lung is a region of plausible size on its
  own side: :func:`covidseg.masks.severity.split_lungs`);
- ``lung_area``: both lungs together cover less than :data:`LUNG_AREA_RANGE` [0] or more than [1] of
  the film (the 2,104 true lung masks of the dev data cover 9.7-55 % of their films);
- ``outside``: more than :data:`MOSTLY_OUTSIDE` of the predicted infection lies outside the lungs.

Masks are bool (H, W) at the film's size; ``grey`` is the film's uint8 (H, W).
"""

from __future__ import annotations

import numpy as np

from covidseg.data.decode import LOW_RANGE_LEVELS

LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "XTABLE LATERAL"})  # decubitus (LLD, RLD): unknown
FRONTAL_VIEWS = {"PA": "PA", "AP": "AP", "APS": "AP", "PAS": "PA"}
# BodyPartExamined is free text in practice ("CHEST PA", "PORTABLE CHEST", "TORACE"): a chest film is one whose
# value holds any of these; any other non-empty value names another part.
CHEST_WORDS = ("CHEST", "THORA", "TORA", "LUNG", "PECHO", "BRUST", "POUMON")
INVERTED_MARGIN = 35.0  # grey levels (of 255) the central strip may be darker than the lung fields
DARK_LEVEL = 64  # a film whose 99th percentile grey level is below this is nearly black
LUNG_AREA_RANGE = (0.05, 0.70)  # of the film's pixels, both lungs together
MOSTLY_OUTSIDE = 50.0  # percent of the infected pixels outside the lungs
REASONS = ("lateral", "not_chest", "low_range", "inverted", "no_lungs", "one_lung", "lung_area", "outside")


def view_of(view_position: str = "", body_part: str = "") -> str:
    """``PA``, ``AP``, ``lateral`` or ``unknown`` from a DICOM ViewPosition (0018,5101); BodyPartExamined
    is read by :func:`severity_refusals`. Non-DICOM films have neither: ``unknown``."""
    view = " ".join(str(view_position or "").upper().split())
    if view in LATERAL_VIEWS:
        return "lateral"
    return FRONTAL_VIEWS.get(view, "unknown")


def looks_inverted(grey: np.ndarray) -> bool:
    """Whether uint8 (H, W) ``grey`` looks like a negative chest film (see the module doc)."""
    h, w = grey.shape
    rows = slice(int(0.2 * h), max(int(0.8 * h), int(0.2 * h) + 1))
    centre = grey[rows, int(0.42 * w) : max(int(0.58 * w), int(0.42 * w) + 1)]
    fields = np.concatenate(
        [grey[rows, int(0.12 * w) : max(int(0.32 * w), 1)].ravel(), grey[rows, int(0.68 * w) : int(0.88 * w)].ravel()]
    )
    if centre.size == 0 or fields.size == 0:
        return False
    return float(centre.mean()) - float(fields.mean()) < -INVERTED_MARGIN


def severity_refusals(
    grey: np.ndarray | None,
    infection: np.ndarray,
    right: np.ndarray,
    left: np.ndarray,
    view: str = "unknown",
    body_part: str = "",
) -> list[tuple[str, str]]:
    """The reasons (code, message) this film can give no severity, in :data:`REASONS` order; [] when it can.

    ``right``/``left``: the split lungs (:func:`covidseg.masks.severity.split_lungs`); ``view``
    from :func:`view_of`; ``body_part`` the header's BodyPartExamined ("" when absent); ``grey``
    None skips the checks of the grey levels (masks alone).
    """
    reasons: list[tuple[str, str]] = []
    if view == "lateral":
        reasons.append(("lateral", "a lateral film: per-lung severity needs a frontal (PA/AP) film"))
    part = " ".join(str(body_part or "").upper().split())
    if part and not any(word in part for word in CHEST_WORDS):
        reasons.append(("not_chest", f"BodyPartExamined {part!r}: not a chest film"))
    if grey is not None:
        lo, hi = (int(v) for v in np.percentile(grey, [1, 99], method="nearest")) if grey.size else (0, 0)
        if hi - lo < LOW_RANGE_LEVELS or hi < DARK_LEVEL:
            reasons.append(("low_range", f"almost no dynamic range or nearly black (grey levels {lo}-{hi} of 0-255)"))
        elif looks_inverted(grey):
            reasons.append(
                ("inverted", "the film looks inverted (spine darker than the lung fields): check its display")
            )
    found = [name for name, lung in (("right", right), ("left", left)) if lung.any()]
    if not found:
        reasons.append(("no_lungs", "no lung found"))
    elif len(found) == 1:
        reasons.append(("one_lung", f"only the patient's {found[0]} lung found"))
    if found:
        share = float((right | left).mean())
        if not LUNG_AREA_RANGE[0] <= share <= LUNG_AREA_RANGE[1]:
            reasons.append(
                (
                    "lung_area",
                    f"the lungs cover {100 * share:.1f} % of the film, outside the plausible "
                    f"{100 * LUNG_AREA_RANGE[0]:.0f}-{100 * LUNG_AREA_RANGE[1]:.0f} %",
                )
            )
    infected = int(infection.sum())
    if infected:
        outside = 100.0 * int((infection & ~(right | left)).sum()) / infected
        if outside > MOSTLY_OUTSIDE:
            reasons.append(("outside", f"{outside:.0f} % of the predicted infection lies outside the lungs"))
    return reasons
