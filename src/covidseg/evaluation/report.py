"""A self-contained HTML report of one pipeline run: metrics, baselines, anchors, figures.

Everything lives in the one file: the CSS is inline and every figure is a base64 ``data:``
URI, so the report opens offline, from an e-mail attachment, or from a DVC remote, with no
script, stylesheet or font fetched from anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from covidseg.atomic import write_text
from covidseg.evaluation import metrics
from covidseg.evaluation.severity_context import anchor_rows, band_rows, interval_sentence

# Published quality on the real COVID-QU-Ex COVID-19 test split: the student report's U-Net test RMSE, and
# MedSegBench's smp U-Nets trained from scratch with Dice loss on the official 1864/466/583 split (per-image
# Dice and IoU at 256 px, resnet18 to densenet121 encoders).
REPORT_RMSE = 0.2288
MEDSEGBENCH_DICE = (0.740, 0.756)
MEDSEGBENCH_IOU = (0.627, 0.647)

FIGURE_CAPTIONS = {
    "sample_overlay.png": "A test X-ray and its infection mask (green, as the truth is in every figure).",
    "loss_curves.png": "Training and validation loss per epoch.",
    "rmse_curves.png": "Training and validation pixel RMSE per epoch; dotted: the report's test RMSE. The curves are of "
    "the uncalibrated probabilities (temperature 1): the temperature is fitted on val after training, "
    "so they are not comparable with the calibrated val and test RMSE in the tables.",
    "prediction_triplets.png": "Input, ground truth (green) and predicted probability for test images spread over the split.",
    "prediction_overlay.png": "Predicted infection (tuned threshold) overlaid on the X-ray.",
    "pr_curve.png": "Pixel precision-recall over thresholds 0 to 1, with the two operating points.",
    "reliability.png": "Reliability diagram: infected share of pixels against their mean predicted probability, "
    "per probability bin; below, how many pixels fall in each bin (log scale).",
    "dice_histogram.png": "Per-image Dice at the tuned threshold.",
    "gallery.png": "Best, median and worst test images by per-image Dice: input, truth, prediction, and the errors "
    "(true positives green, false positives red, false negatives blue).",
    "bland_altman.png": "Bland-Altman plot of each lung's infected share: predicted minus true (percentage points) "
    "against their mean, with the bias and the 95 % limits of agreement.",
    "extent_confusion.png": "Extent score (0-8: each lung 0-4 by infected share) of every test image, true (rows) "
    "against predicted (columns).",
}

# The threshold-free metrics; the mask metrics' definitions come from MASK_METRICS.
PROBABILITY_DEFINITIONS = (
    (
        "RMSE",
        "sqrt((1/P) &Sigma; (p - t)&sup2;) over all P test pixels, p the predicted probability and t the 0/1 truth. "
        "The report's metric; threshold-free. Lower is better.",
    ),
    ("Brier", "(1/P) &Sigma; (p - t)&sup2; = RMSE&sup2;. Lower is better."),
    (
        "ECE",
        "Expected calibration error: pixels binned by p into equal-width bins; "
        "&Sigma;<sub>b</sub> (n<sub>b</sub>/P) |mean t<sub>b</sub> - mean p<sub>b</sub>|. 0 is perfectly calibrated.",
    ),
)
TUNED_THRESHOLD_DEFINITION = (
    "Tuned threshold",
    "The threshold that maximised mean per-image Dice on the validation split; the test split never chooses anything.",
)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _pm(block: dict, key: str, digits: int = 4) -> str:
    mean, std = block.get(f"{key}_mean"), block.get(f"{key}_std")
    return _fmt(mean, digits) if std is None else f"{_fmt(mean, digits)} &plusmn; {_fmt(std, digits)}"


def _read_json(path: str | Path | None, what: str) -> dict:
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found (run the stage that writes it, e.g. `dvc repro`)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} should hold a JSON object")
    return data


def _png_data_uri(path: Path) -> str:
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _intervals(block: dict) -> str:
    """The headline intervals as one cell: 'RMSE [lo, hi]; Dice [lo, hi]; IoU [lo, hi]'."""
    if not block:
        return "n/a"
    return "; ".join(
        f"{name} [{_fmt(block.get(f'{key}_ci95_low'))}, {_fmt(block.get(f'{key}_ci95_high'))}]"
        for name, key in (("RMSE", "rmse"), *((m.label, m.name) for m in metrics.MASK_METRICS if m.interval))
    )


def _mask_metric_rows(fixed: dict, tuned: dict) -> list[list[str]]:
    """Per :data:`~covidseg.evaluation.metrics.MASK_METRICS` entry: its per-image mean ± std, then its global and median where it has them."""
    rows = []
    for m in metrics.MASK_METRICS:
        label = f"{m.label} ({m.unit})" if m.unit else m.label
        rows.append(
            [f"{label}, per-image mean &plusmn; std", _pm(fixed, m.name, m.digits), _pm(tuned, m.name, m.digits)]
        )
        if m.pooled is not None:
            key = f"{m.name}_global"
            rows.append([f"{label}, global", _fmt(fixed.get(key), m.digits), _fmt(tuned.get(key), m.digits)])
        if m.median:
            key = f"{m.name}_median"
            rows.append([f"{label}, median", _fmt(fixed.get(key), m.digits), _fmt(tuned.get(key), m.digits)])
    return rows


def metrics_table(test: dict) -> str:
    """The model's test metrics at the fixed and the tuned threshold, as an HTML table."""
    fixed, tuned = test.get("at_fixed_threshold") or {}, test.get("at_tuned_threshold") or {}
    col = [f"threshold {_fmt(fixed.get('threshold'), 3)}", f"tuned on val: {_fmt(tuned.get('threshold'), 3)}"]
    same = lambda v: [v, v]  # noqa: E731 - threshold-free rows
    rows = [
        ["RMSE (all pixels)", *same(_fmt(test.get("rmse")))],
        ["RMSE, Dice, IoU (0.5): 95 % intervals", *same(_intervals(test.get("intervals") or {}))],
        ["Brier score", *same(_fmt(test.get("brier")))],
        [f"ECE ({_fmt(test.get('ece_bins'))} bins)", *same(_fmt(test.get("ece")))],
        *_mask_metric_rows(fixed, tuned),
        ["images with a defined Dice", _fmt(fixed.get("images_scored")), _fmt(tuned.get("images_scored"))],
        [
            "images with empty truth (of which predicted infected)",
            f"{_fmt(fixed.get('empty_truth_images'))} ({_fmt(fixed.get('empty_truth_false_positive_images'))})",
            f"{_fmt(tuned.get('empty_truth_images'))} ({_fmt(tuned.get('empty_truth_false_positive_images'))})",
        ],
    ]
    return _table(["metric", *col], rows, "metrics")


SEVERITY_ROWS = (
    ("model", "model: predicted infection in predicted lungs"),
    ("oracle_true_lungs", "oracle: predicted infection in the true lungs"),
    ("baseline_constant_share", "baseline: every lung at the train median share"),
)


def severity_table(test: dict) -> str:
    """Severity against the truth for the model, the true-lungs oracle and the constant baseline."""
    severity = test.get("severity") or {}
    rows = []
    for key, label in SEVERITY_ROWS:
        b = severity.get(key) or {}
        if "error" in b:
            rows.append([label, html.escape(b["error"]), *[""] * 6])
            continue
        mae = f"{_fmt(b.get('share_mae'), 1)} [{_fmt(b.get('share_mae_ci95_low'), 1)}, {_fmt(b.get('share_mae_ci95_high'), 1)}]"
        loa = (
            f"{_fmt(b.get('share_bias'), 1)} ({_fmt(b.get('share_loa_low'), 1)} to {_fmt(b.get('share_loa_high'), 1)})"
        )
        rows.append(
            [
                label,
                _fmt(b.get("lung_dice"), 3),
                mae,
                loa,
                _fmt(b.get("share_spearman"), 3),
                f"{_fmt(b.get('extent_exact'), 3)} / {_fmt(b.get('extent_within1'), 3)}",
                _fmt(b.get("extent_kappa"), 3),
                _fmt(b.get("lungs_missed")),
            ]
        )
    header = [
        "predictor",
        "lung Dice",
        "share MAE (points) [95 % CI]",
        "bias (limits of agreement)",
        "Spearman",
        "extent exact / within 1",
        "extent kappa (quadratic)",
        "lungs missed",
    ]
    return _table(header, rows, "severity") if severity else "<p>No severity block in the metrics.</p>"


def severity_context(test: dict) -> str:
    """The model's severity beside the reader-agreement anchors, its share error by true-share band, and the
    coverage of its per-lung intervals (covidseg.evaluation.severity_context)."""
    model = (test.get("severity") or {}).get("model") or {}
    if not model or "error" in model:
        return ""
    anchors = _table(["who", "agreement", "scale", "source"], [[html.escape(c) for c in r] for r in anchor_rows(model)])
    bands = _table(["true share", "lungs", "share MAE (points)", "bias (points)"], band_rows(model))
    return f"{anchors}<p>Share error by the lung's true share:</p>{bands}<p>{html.escape(interval_sentence(model))}</p>"


def baselines_table(test: dict) -> str:
    """The model beside trivial predictors and published anchors (RMSE, Brier, Dice)."""
    fixed = test.get("at_fixed_threshold") or {}
    rows = [
        [
            "<b>this model</b>",
            _fmt(test.get("rmse")),
            _fmt(test.get("brier")),
            _fmt(fixed.get("dice_mean")),
            _fmt(fixed.get("dice_global")),
            "this run, threshold 0.5",
        ]
    ]
    notes = {
        "all_background": "p = 0 everywhere",
        "constant_prior": "p = train infected-pixel share ({prior}) everywhere",
        "lung_mask": "p = 0.5 inside the true lung masks: 'the whole lung is infected'",
    }
    for name, b in (test.get("baselines") or {}).items():
        note = notes.get(name, "").format(prior=_fmt(b.get("prior")))
        rows.append(
            [
                html.escape(name.replace("_", " ")),
                _fmt(b.get("rmse")),
                _fmt(b.get("brier")),
                _fmt(b.get("dice_mean")),
                _fmt(b.get("dice_global")),
                note,
            ]
        )
    rows.append(
        [
            "the report (reference)",
            f"{REPORT_RMSE:.4f}",
            "",
            "not measured",
            "",
            "U-Net, BCE; real COVID-QU-Ex test split",
        ]
    )
    rows.append(
        [
            "MedSegBench (reference)",
            "",
            "",
            f"{MEDSEGBENCH_DICE[0]:.3f} to {MEDSEGBENCH_DICE[1]:.3f}",
            "",
            f"smp U-Net from scratch, Dice loss, same split; IoU {MEDSEGBENCH_IOU[0]:.3f} to {MEDSEGBENCH_IOU[1]:.3f}",
        ]
    )
    return _table(["predictor", "RMSE", "Brier", "Dice (per-image)", "Dice (global)", "what it is"], rows, "baselines")


def run_table(train: dict, data: dict, source: str | None) -> str:
    """Where the numbers come from: data source, split sizes, training summary."""
    rows = []
    if source:
        rows.append(["data source", html.escape(source)])
    counts = ", ".join(f"{s} {_fmt((data.get(s) or {}).get('count'))}" for s in ("train", "val", "test") if s in data)
    if counts:
        rows.append(["images per split", counts])
    if "skipped_total" in data:
        rows.append(["pairs skipped at extraction", _fmt(data["skipped_total"])])
    for key, label in (
        ("epochs_run", "epochs run"),
        ("best_epoch", "best epoch (restored)"),
        ("threshold", "tuned threshold"),
        ("temperature", "temperature"),
        ("device", "device"),
        ("precision", "precision"),
    ):
        if key in train:
            rows.append([label, _fmt(train[key], 3)])
    return _table(["run", "value"], rows, "run") if rows else ""


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#1d1d1f;line-height:1.45;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #d5d5d5;padding:.3em .6em;text-align:left}
th{background:#f3f4f6}td:not(:first-child){font-variant-numeric:tabular-nums}
.note{color:#555;font-size:.9em}figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:.3em}dt{font-weight:600;margin-top:.5em}dd{margin-left:1.2em}
.rule{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em}
"""


def render_report(test: dict, train: dict, data: dict, figures: list[Path], source: str | None = None) -> str:
    """The report as one HTML string (figures read from ``figures`` and embedded)."""
    figs = []
    for path in figures:
        caption = FIGURE_CAPTIONS.get(path.name, path.stem.replace("_", " "))
        figs.append(
            f'<figure id="{html.escape(path.stem)}"><img alt="{html.escape(caption)}" '
            f'src="{_png_data_uri(path)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        )
    mask_defs = tuple((m.label, html.escape(m.definition)) for m in metrics.MASK_METRICS)
    definitions = (*PROBABILITY_DEFINITIONS, *mask_defs, TUNED_THRESHOLD_DEFINITION)
    defs = "".join(f"<dt>{name}</dt><dd>{text}</dd>" for name, text in definitions)
    rule = html.escape(test.get("empty_truth_rule", "not stated in metrics/test_details.json"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>covidseg report</title><style>{CSS}</style></head>
<body>
<h1>covidseg: COVID-19 infection segmentation report</h1>
<p class="note">Test split, {_fmt(test.get("n_images"))} images. Written by the <code>plots</code> stage (no timestamp: the
same inputs give the same file);
all figures are embedded, so this file opens offline. Definitions are at the end and in <code>docs/metrics.md</code>.</p>
{run_table(train, data, source)}
<h2>Test metrics</h2>
{metrics_table(test)}
<p class="note">Test-time flip averaging: {_fmt(test.get("flip_tta"))}. Threshold-free metrics (RMSE, Brier, ECE)
are the same in both columns.</p>
<h2>Baselines and references</h2>
{baselines_table(test)}
<p class="note">The references were measured on the real COVID-QU-Ex COVID-19 test split (583 images, 256 px);
compare with them only when this run used that data. Per-image Dice is the comparable number.</p>
<h2>Severity: infected share of each lung</h2>
{severity_table(test)}
{severity_context(test)}
<p class="note">Share: infected pixels inside the lung / the lung's pixels (%), the image's left lung being the
patient's right. Extent score: each lung 0 (none), 1 (under 25 %), 2 (25-50 %), 3 (50-75 %), 4 (75 % or more),
summed to 0-8 (Wong et al., Radiology 2020). A lung the predictor misses scores 0 and is counted.</p>
<h2>Figures</h2>
{"".join(figs)}
<h2>Definitions</h2>
<dl>{defs}</dl>
<p class="rule"><b>Empty-truth rule.</b> {rule}</p>
</body></html>
"""


def write_report(
    test_json: str | Path,
    train_json: str | Path | None,
    data_json: str | Path | None,
    figures: list[Path],
    out_path: str | Path,
    source: str | None = None,
) -> Path:
    """Read the metrics JSON files, embed ``figures`` (PNG paths) and write the HTML atomically to ``out_path``."""
    test = _read_json(test_json, "test metrics")
    html_text = render_report(
        test,
        _read_json(train_json, "train metrics"),
        _read_json(data_json, "data metrics"),
        [Path(f) for f in figures],
        source,
    )
    write_text(out_path, html_text)
    return Path(out_path)
