"""Severity beside what readers and published models reach, the share error by true-share band, and the
per-lung intervals' coverage: the rows the report and the model card show (both from the details file)."""

from __future__ import annotations

# Published anchors. Neither is a like-for-like target: another scale or another task, for context.
ANCHORS = (
    (
        "two radiologists, senior vs junior (BrixIA)",
        "QWK 0.85",
        "0-18 Brixia global score (another scale)",
        "Signoroni et al., Medical Image Analysis 71:102046, 2021 (BrixIA public annotations)",
    ),
    (
        "CXR-pretrained regression of extent",
        "MAE 1.14",
        "0-8 extent score (this scale)",
        "Cohen et al., Cureus 12(7):e9448, 2020",
    ),
)


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def anchor_rows(model: dict) -> list[list[str]]:
    """[who, agreement, scale, source] rows: this model's extent QWK and MAE first, then :data:`ANCHORS`."""
    ours = f"QWK {_num(model.get('extent_kappa'), 3)}, MAE {_num(model.get('extent_mae'))}"
    return [["this model (test split)", ours, "0-8 extent score", "this run"], *map(list, ANCHORS)]


def band_rows(model: dict) -> list[list[str]]:
    """[true-share band, lungs, share MAE, bias] rows of the details' ``share_error_by_true_band``."""
    return [
        [f"{b['band']} %", str(b["lungs"]), _num(b.get("mae"), 1), _num(b.get("bias"), 1)]
        for b in model.get("share_error_by_true_band") or []
    ]


def interval_sentence(model: dict) -> str:
    """One sentence on the per-lung 95 % intervals (coverage, width, review flags), or why there are none."""
    block = model.get("share_interval")
    if not block:
        return "No per-lung share intervals: the model file records no interval model (trained before it, or too few val lungs)."
    return (
        f"Per-lung 95 % share intervals ({block['method']}, q {block['q']:.2f}, from {block['lungs']} val lungs): "
        f"{_num(100 * block['coverage'] if block.get('coverage') is not None else None, 1)} % of the "
        f"{block['lungs_scored']} true test shares lie inside, mean width {_num(block.get('mean_width'), 1)} points. "
        f"{block['flagged_films']} films are flagged for review (share error {_num(block.get('share_mae_flagged'), 1)} "
        f"points, against {_num(block.get('share_mae_others'), 1)} for the others)."
    )
