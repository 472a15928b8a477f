"""The one table of mask metrics (metrics.MASK_METRICS): per-image columns, summaries, the headline, the
report's rows, the model card's rows and the bootstrap intervals all come from it, so a new metric is one row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidseg.evaluation import evaluate, metrics, model_card, report
from covidseg.evaluation.metrics import MaskMetric, headline_key, threshold_metrics
from covidseg.masks.counts import _ratio

ROOT = Path(__file__).resolve().parents[1]

SPECIFICITY = MaskMetric(
    "specificity",
    "Specificity",
    "TN / (TN + FP): the share of clean pixels left unmarked.",
    lambda pred, truth, c: _ratio(c.tn, c.tn + c.fp, np.nan),
    pooled=lambda c: _ratio(c.tn, c.tn + c.fp, np.nan),
    interval=True,
    headline=("mean", "global"),
)


def _two_images() -> tuple[np.ndarray, np.ndarray]:
    """Image 0: 1 TP, 1 FP, 0 FN, 2 TN; image 1: 0 TP, 0 FP, 1 FN, 3 TN (2 x 2 pixels each)."""
    prob = np.array([[[0.9, 0.8], [0.1, 0.0]], [[0.2, 0.0], [0.0, 0.0]]], np.float32)
    truth = np.array([[[1, 0], [0, 0]], [[1, 0], [0, 0]]], bool)
    return prob, truth


def _summary(prob: np.ndarray, truth: np.ndarray) -> tuple[dict, object]:
    fixed, per = threshold_metrics(prob, truth, 0.5)
    tuned, _ = threshold_metrics(prob, truth, 0.85)
    summary = {
        "n_images": len(prob),
        "rmse": metrics.rmse(prob, truth),
        "ece": 0.0,
        "at_fixed_threshold": fixed,
        "at_tuned_threshold": tuned,
        "intervals": evaluate._intervals(prob, truth, per, n_resamples=200),
    }
    return summary, per


def test_a_new_metric_is_one_row_of_the_table(monkeypatch):
    monkeypatch.setattr(metrics, "MASK_METRICS", (*metrics.MASK_METRICS, SPECIFICITY))
    prob, truth = _two_images()
    summary, per = _summary(prob, truth)
    fixed = summary["at_fixed_threshold"]
    # by hand: image 0 TN/(TN+FP) = 2/3, image 1 = 3/3; pooled (2+3)/(2+3+1) = 5/6
    assert per["specificity"].tolist() == pytest.approx([2 / 3, 1.0])
    assert fixed["specificity_mean"] == pytest.approx(5 / 6)
    assert fixed["specificity_std"] == pytest.approx(1 / 6)
    assert fixed["specificity_global"] == pytest.approx(5 / 6)
    assert "specificity_median" not in fixed

    head = evaluate.headline(summary)
    assert head["specificity"] == pytest.approx(5 / 6)
    assert head["specificity_global"] == pytest.approx(5 / 6)
    assert head["specificity_ci95_low"] <= 5 / 6 <= head["specificity_ci95_high"]
    assert "specificity_at_threshold" not in head

    table = report.metrics_table(summary)
    assert "Specificity, per-image mean" in table and "Specificity, global" in table
    assert "Specificity [" in report._intervals(summary["intervals"])
    rows = "\n".join(model_card._mask_metric_rows(head))
    assert "| specificity | 0.8333 |" in rows and "| specificity_global | 0.8333 | n/a |" in rows


def test_the_headline_keys_and_order_come_from_the_table():
    prob, truth = _two_images()
    summary, _ = _summary(prob, truth)
    head = evaluate.headline(summary)
    keys = list(head)
    # the order metrics/test.json has always had: the means, ece and the threshold, tuned, global, median, intervals
    assert keys[:9] == [
        "n_images",
        "rmse",
        "dice",
        "iou",
        "ece",
        "threshold",
        "dice_at_threshold",
        "dice_global",
        "hd95_median",
    ]
    assert keys[9:15] == list(evaluate.interval_keys())
    assert evaluate.interval_keys()[-2:] == ("rmse_ci95_low", "rmse_ci95_high")
    # dice at 0.5: image 0 2*1/(2+1) = 2/3, image 1 0; at 0.85 image 0 = 1 (only the 0.9 pixel), image 1 0
    assert head["dice"] == pytest.approx(1 / 3)
    assert head["dice_at_threshold"] == pytest.approx(0.5)
    assert head["dice_global"] == pytest.approx(2 / 4)  # 2TP / (2TP + FP + FN) summed: 2 / (2 + 1 + 1)


def test_every_metric_of_the_table_has_its_doc_line():
    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    lines = [line.lower() for line in doc.splitlines()]
    for m in metrics.MASK_METRICS:
        label = m.label.lower()
        defined = any(line.startswith((f"| {label} ", f"## {label}")) for line in lines)
        assert defined, f"docs/metrics.md has no table row or section for {m.label}"
        for stat in m.headline:
            assert f"`{headline_key(m, stat)}`" in doc, f"docs/metrics.md does not list {headline_key(m, stat)}"


def test_headline_key_refuses_an_unknown_stat():
    with pytest.raises(ValueError, match="headline stat"):
        headline_key(metrics.MASK_METRICS[0], "max")
