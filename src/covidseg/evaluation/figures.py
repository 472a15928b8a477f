"""The report's figures, and the ones researchers expect beside them, as PNG files.

All images are uint8 (S, S) grey X-rays; masks bool (S, S); probabilities float (S, S) in [0, 1].
Predictions come from ``data/predictions/test.npz`` (probabilities stored as round(255 p), so a
pixel within 1/510 of the threshold may flip against the exact evaluation: invisible in a figure).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from covidseg.atomic import atomic_path  # noqa: E402
from covidseg.data.arrays import load_split  # noqa: E402
from covidseg.evaluation.report import REPORT_RMSE  # noqa: E402
from covidseg.inference.overlay import TINT, draw_outline, tint  # noqa: E402
from covidseg.masks.severity import LUNG_THRESHOLD  # noqa: E402
from covidseg.params import PlotsParams  # noqa: E402

FIGURES = (
    "sample_overlay.png",
    "loss_curves.png",
    "rmse_curves.png",
    "prediction_triplets.png",
    "prediction_overlay.png",
    "pr_curve.png",
    "reliability.png",
    "dice_histogram.png",
    "gallery.png",
    "bland_altman.png",
    "extent_confusion.png",
)
TRUTH_COLOR, PRED_COLOR = (0.1, 0.85, 0.2), TINT


def overlay(
    image: np.ndarray, mask: np.ndarray, color: tuple[float, float, float] = (1.0, 0.15, 0.1), alpha: float = 0.45
) -> np.ndarray:
    """uint8 RGB (S, S, 3) of the grey uint8 image with ``mask`` tinted in ``color`` (as ``covidseg predict`` draws it)."""
    return tint(image, mask, color, alpha)


def error_map(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB (S, S, 3): true positives green, false positives red, false negatives blue, on a dimmed image."""
    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0 * 0.7, 3, axis=2)
    for sel, col in (
        (pred & truth, (0.1, 0.85, 0.2)),
        (pred & ~truth, (0.95, 0.1, 0.1)),
        (~pred & truth, (0.15, 0.35, 1.0)),
    ):
        rgb[sel] = 0.4 * rgb[sel] + 0.6 * np.asarray(col, np.float32)
    return rgb


def _save(fig: plt.Figure, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png", facecolor="white")
    plt.close(fig)
    return path


def _show(ax, img, title: str, **kw):
    grey = {"cmap": "gray", "vmin": 0, "vmax": 255} if img.ndim == 2 and img.dtype == np.uint8 else {}
    handle = ax.imshow(img, **(grey | kw))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return handle


def curves_figure(curves: pd.DataFrame, metric: str, ylabel: str, reference: float | None = None) -> plt.Figure:
    """Train and val ``metric`` per epoch from curves.tsv (columns epoch, train_<metric>, val_<metric>)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(curves["epoch"], curves[f"train_{metric}"], "o-", ms=3, label="train")
    ax.plot(curves["epoch"], curves[f"val_{metric}"], "o-", ms=3, label="val")
    if reference is not None:
        ax.axhline(reference, ls=":", color="grey", label=f"report, test ({reference:g})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per epoch", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def pr_figure(pr: pd.DataFrame, points: list[tuple[str, float, float]]) -> plt.Figure:
    """Pixel precision-recall curve (pr.csv rows) with operating points (label, recall, precision)."""
    pr = pr.dropna(subset=["precision", "recall"])
    fig, ax = plt.subplots(figsize=(4.4, 4))
    ax.plot(pr["recall"], pr["precision"], label="model, thresholds 0..1")
    if len(pr):
        base = float(pr["precision"].iloc[0]) if float(pr["threshold"].iloc[0]) == 0 else None
        if base is not None:  # at threshold 0 every pixel is predicted: precision = prevalence
            ax.axhline(base, ls=":", color="grey", label=f"prevalence ({base:.3f})")
    # The fixed point last, hollow and larger, so a tuned point at (nearly) the same place never hides it.
    styles = ({"marker": "o", "ms": 11, "mfc": "none", "mew": 2, "zorder": 4}, {"marker": "s", "ms": 6, "zorder": 3})
    for (label, r, p), style in reversed(list(zip(points, styles))):
        if np.isfinite(r) and np.isfinite(p):
            ax.plot([r], [p], ls="none", label=label, **style)
    ax.set_xlabel("recall (pixels)")
    ax.set_ylabel("precision (pixels)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("test precision-recall over thresholds", fontsize=9)
    return fig


def reliability_figure(cal: pd.DataFrame, ece: float | None) -> plt.Figure:
    """Reliability diagram from calibration.csv rows, with the pixel count per bin below it."""
    cal = cal.dropna(subset=["mean_probability", "fraction_infected"])
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(4.4, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(cal["mean_probability"], cal["fraction_infected"], "o-", label="model")
    ax.set_ylabel("fraction of pixels infected")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ece_txt = f", ECE {ece:.3f}" if ece is not None and np.isfinite(ece) else ""
    ax.set_title(f"reliability diagram (test pixels{ece_txt})", fontsize=9)
    if {"bin_lo", "bin_hi"} <= set(cal.columns) and len(cal):
        axn.bar(
            cal["bin_lo"],
            cal["pixels"],
            width=cal["bin_hi"] - cal["bin_lo"],
            align="edge",
            color="tab:blue",
            alpha=0.6,
            edgecolor="white",
        )
        axn.set_yscale("log")
    axn.set_xlabel("mean predicted probability")
    axn.set_ylabel("pixels", fontsize=8)
    axn.grid(alpha=0.3)
    return fig


def dice_histogram_figure(dice: pd.Series, threshold: float) -> plt.Figure:
    """Histogram of per-image Dice (NaN = undefined images, counted in the title, not drawn)."""
    scored = dice.dropna()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.hist(scored, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    if len(scored):
        ax.axvline(scored.mean(), color="black", ls="--", lw=1, label=f"mean {scored.mean():.3f}")
        ax.axvline(scored.median(), color="tab:orange", ls=":", lw=1.5, label=f"median {scored.median():.3f}")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(0, 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"per-image Dice (threshold {threshold:g})")
    ax.set_ylabel("images")
    undefined = int(dice.isna().sum())
    ax.set_title(
        f"{len(scored)} test images scored" + (f", {undefined} undefined (both empty)" if undefined else ""), fontsize=9
    )
    return fig


def make_figures(
    prepared_dir: str | Path,
    predictions_path: str | Path,
    curves_tsv: str | Path | None,
    eval_dir: str | Path,
    per_image_csv: str | Path,
    out_dir: str | Path,
    params: PlotsParams,
    metrics_json: str | Path | None = None,
) -> list[Path]:
    """Draw every figure in FIGURES into ``out_dir``; returns their paths.

    ``metrics_json`` (metrics/test.json, optional) adds the operating points to the PR curve and
    the ECE to the reliability diagram. ``curves_tsv`` None (a model scored without its training run,
    as ``covidseg evaluate`` does) leaves out the two training-curve figures.
    """
    out_dir = Path(out_dir)
    test = load_split(prepared_dir, "test")
    with np.load(predictions_path) as z:
        probs = z["probs"].astype(np.float32) / 255.0
        threshold = float(z["threshold"])
        lungs = z["lungs"] >= round(255 * LUNG_THRESHOLD) if "lungs" in z.files else None
    images, truth, ids = test["images"][:, 0], test["masks"][:, 0].astype(bool), test["ids"]
    if probs.shape != truth.shape:
        raise ValueError(
            f"{predictions_path}: probabilities {probs.shape} do not match {prepared_dir}/test.npz masks "
            f"{truth.shape} (rerun `dvc repro evaluate`)"
        )
    preds = probs >= threshold
    curves = None if curves_tsv is None else pd.read_csv(curves_tsv, sep="\t")
    per = pd.read_csv(per_image_csv)
    summary = json.loads(Path(metrics_json).read_text(encoding="utf-8")) if metrics_json else {}
    eval_dir = Path(eval_dir)
    dpi = params.dpi
    i0 = min(params.sample_index, len(images) - 1)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    _show(axes[0], images[i0], f"X-ray {ids[i0]}")
    _show(axes[1], overlay(images[i0], truth[i0], color=TRUTH_COLOR), "infection mask (green) overlaid")
    written.append(_save(fig, out_dir / "sample_overlay.png", dpi))

    for metric, ylabel, name, ref in (
        ("loss", "loss", "loss_curves.png", None),
        ("rmse", "pixel RMSE (uncalibrated, temperature 1)", "rmse_curves.png", REPORT_RMSE),
    ):
        if curves is not None:
            written.append(_save(curves_figure(curves, metric, ylabel, ref), out_dir / name, dpi))

    rows = _spread(len(images), params.gallery_size)
    fig, axes = plt.subplots(len(rows), 3, figsize=(8.6, 2.8 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        _show(axes[r, 0], images[i], f"input {ids[i]}")
        _show(axes[r, 1], overlay(images[i], truth[i], color=TRUTH_COLOR), "ground truth (green)")
        handle = _show(axes[r, 2], probs[i], "predicted probability", cmap="magma", vmin=0, vmax=1)
    fig.colorbar(handle, ax=axes, fraction=0.025, pad=0.02, label="probability of infection")
    written.append(_save(fig, out_dir / "prediction_triplets.png", dpi))

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.3), squeeze=False)
    for c, i in enumerate(rows):
        shown = overlay(images[i], preds[i], color=PRED_COLOR)
        _show(axes[0, c], shown if lungs is None else draw_outline(shown, lungs[i]), f"{ids[i]}")
    lung_note = "" if lungs is None else ", predicted lungs outlined (blue)"
    fig.suptitle(f"predicted infection (yellow, p >= {threshold:g}){lung_note} on the X-ray", fontsize=10)
    written.append(_save(fig, out_dir / "prediction_overlay.png", dpi))

    points = []
    for key, label in (("at_fixed_threshold", "threshold"), ("at_tuned_threshold", "tuned threshold")):
        s = summary.get(key) or {}
        if s.get("recall_global") is not None and s.get("precision_global") is not None:
            points.append((f"{label} {s['threshold']:g}", float(s["recall_global"]), float(s["precision_global"])))
    written.append(_save(pr_figure(pd.read_csv(eval_dir / "pr.csv"), points), out_dir / "pr_curve.png", dpi))
    written.append(
        _save(
            reliability_figure(pd.read_csv(eval_dir / "calibration.csv"), summary.get("ece")),
            out_dir / "reliability.png",
            dpi,
        )
    )
    written.append(_save(dice_histogram_figure(per["dice_tuned"], threshold), out_dir / "dice_histogram.png", dpi))
    written.append(
        _save(gallery_figure(images, truth, preds, ids, per["dice_tuned"].to_numpy()), out_dir / "gallery.png", dpi)
    )
    written += severity_figures(eval_dir / "severity.csv", summary.get("severity") or {}, out_dir, dpi)
    return written


def severity_figures(severity_csv: Path, severity: dict, out_dir: Path, dpi: int) -> list[Path]:
    """Bland-Altman of per-lung shares and the extent-score confusion matrix: of the model when it has a
    lung head, else of the true-lungs oracle (the title says which). ``severity`` is the details block."""
    if not severity_csv.is_file():
        return []
    table = pd.read_csv(severity_csv)
    if "true_extent_score" not in table.columns:
        return []  # no scored film has a lung mask: no true severity to draw
    table = table.dropna(subset=["true_extent_score"])  # films without a lung mask have no true severity
    who = "pred" if "pred_right_pct" in table.columns else "oracle"
    label = (
        "model (predicted lungs)" if who == "pred" else "oracle: predicted infection in the true lungs (no lung head)"
    )
    pred, true = per_lung_shares(table, who)
    counts = f"{len(true)} lungs of {len(table)} films"
    written = [
        _save(
            bland_altman_figure(pred, true, f"Per-lung infected share, {label} ({counts})"),
            out_dir / "bland_altman.png",
            dpi,
        )
    ]
    block = severity.get("model" if who == "pred" else "oracle_true_lungs") or {}
    matrix = block.get("extent_confusion")
    if matrix is None:  # details file absent: count from the table
        matrix = np.zeros((9, 9), int)
        pairs = (table["true_extent_score"].to_numpy(int), table[f"{who}_extent_score"].to_numpy(int))
        np.add.at(matrix, pairs, 1)
    title = f"Extent score (0-8), {label} ({int(np.asarray(matrix).sum())} films)"
    written.append(_save(extent_confusion_figure(np.asarray(matrix), title), out_dir / "extent_confusion.png", dpi))
    return written


def per_lung_shares(severity: pd.DataFrame, who: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) per-lung infected shares in percent from the severity table's ``{who}_*`` and
    ``true_*`` columns, lungs absent from the truth left out and a missed lung counted as 0."""
    pred = severity[[f"{who}_right_pct", f"{who}_left_pct"]].to_numpy(float).ravel()
    true = severity[["true_right_pct", "true_left_pct"]].to_numpy(float).ravel()
    keep = ~np.isnan(true)
    return np.nan_to_num(pred[keep], nan=0.0), true[keep]


def bland_altman_figure(pred: np.ndarray, true: np.ndarray, title: str) -> plt.Figure:
    """Predicted minus true infected share of each lung (percentage points) against their mean, with the
    bias and the 95 % limits of agreement (bias -+ 1.96 sd)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    mean, diff = (pred + true) / 2, pred - true
    ax.scatter(mean, diff, s=10, alpha=0.6, color="#3b6fb6", edgecolors="none")
    if diff.size >= 2:
        bias, sd = float(diff.mean()), float(diff.std(ddof=1))
        for y, style, label in (
            (bias, "-", f"bias {bias:+.1f}"),
            (bias - 1.96 * sd, "--", f"-1.96 sd {bias - 1.96 * sd:+.1f}"),
            (bias + 1.96 * sd, "--", f"+1.96 sd {bias + 1.96 * sd:+.1f}"),
        ):
            ax.axhline(y, color="#c0392b", linestyle=style, linewidth=1, label=label)
        ax.legend(fontsize=8, loc="upper right")
    ax.axhline(0, color="#888", linewidth=0.6)
    ax.set_xlim(0, 100)
    ax.set_xlabel("mean of predicted and true infected share of the lung (%)")
    ax.set_ylabel("predicted - true (percentage points)")
    ax.set_title(title, fontsize=10)
    return fig


def extent_confusion_figure(matrix: np.ndarray, title: str) -> plt.Figure:
    """Counts of images by true (rows) and predicted (columns) extent score 0-8."""
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(5.4, 4.8))
    ax.imshow(matrix, cmap="Blues")
    k = matrix.shape[0]
    for i in range(k):
        for j in range(k):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black",
                )
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted extent score (0-8)")
    ax.set_ylabel("true extent score (0-8)")
    ax.set_title(title, fontsize=10)
    return fig


def gallery_figure(
    images: np.ndarray, truth: np.ndarray, preds: np.ndarray, ids: np.ndarray, dice: np.ndarray
) -> plt.Figure:
    """Best, median and worst test images by per-image Dice: input, truth, prediction, errors coloured."""
    order = [int(i) for i in np.argsort(-np.nan_to_num(dice, nan=-1.0), kind="stable") if np.isfinite(dice[i])]
    picks: list[tuple[str, int]] = []
    if order:
        for label, i in (("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])):
            if i not in [p for _, p in picks]:
                picks.append((label, i))
    n = max(len(picks), 1)
    fig, axes = plt.subplots(n, 4, figsize=(10.5, 2.8 * n), squeeze=False)
    if not picks:
        for ax in axes[0]:
            ax.axis("off")
        axes[0, 0].text(0, 0.5, "no test image has a defined Dice (all truths and predictions empty)", fontsize=10)
    for r, (label, i) in enumerate(picks):
        _show(axes[r, 0], images[i], f"{label}: {ids[i]}, Dice {dice[i]:.2f}")
        _show(axes[r, 1], overlay(images[i], truth[i], color=TRUTH_COLOR), "truth (green)")
        _show(axes[r, 2], overlay(images[i], preds[i], color=PRED_COLOR), "prediction (yellow)")
        _show(axes[r, 3], error_map(images[i], preds[i], truth[i]), "TP green, FP red, FN blue")
    return fig


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))
