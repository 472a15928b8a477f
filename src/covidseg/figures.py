"""The report's figures, and the ones researchers expect beside them, as PNG files.

All images are uint8 (S, S) grey X-rays; masks bool (S, S); probabilities float (S, S) in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from covidseg.atomic import atomic_path  # noqa: E402
from covidseg.params import PlotsParams  # noqa: E402
from covidseg.preprocess import load_split  # noqa: E402

FIGURES = (
    "sample_overlay.png", "loss_curves.png", "rmse_curves.png", "prediction_triplets.png", "prediction_overlay.png",
    "pr_curve.png", "reliability.png", "dice_histogram.png", "gallery.png",
)


def overlay(image: np.ndarray, mask: np.ndarray, color=(1.0, 0.15, 0.1), alpha: float = 0.45) -> np.ndarray:
    """RGB float (S, S, 3) of the grey image with ``mask`` tinted in ``color``."""
    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
    tint = np.asarray(color, np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * tint
    return rgb


def error_map(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB (S, S, 3): true positives green, false positives red, false negatives blue."""
    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0 * 0.7, 3, axis=2)
    for sel, col in ((pred & truth, (0.1, 0.85, 0.2)), (pred & ~truth, (0.95, 0.1, 0.1)), (~pred & truth, (0.15, 0.35, 1.0))):
        rgb[sel] = 0.4 * rgb[sel] + 0.6 * np.asarray(col, np.float32)
    return rgb


def _save(fig: plt.Figure, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def _show(ax, img, title: str, **kw) -> None:
    ax.imshow(img, **({"cmap": "gray", "vmin": 0, "vmax": 255} if img.ndim == 2 and img.dtype == np.uint8 else {}) | kw)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def curves_figure(curves: pd.DataFrame, metric: str, ylabel: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(curves["epoch"], curves[f"train_{metric}"], "o-", ms=3, label="train")
    ax.plot(curves["epoch"], curves[f"val_{metric}"], "o-", ms=3, label="val")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def make_figures(prepared_dir: str | Path, predictions_path: str | Path, curves_tsv: str | Path, eval_dir: str | Path,
                 per_image_csv: str | Path, out_dir: str | Path, params: PlotsParams) -> list[Path]:
    """Draw every figure in FIGURES into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    test = load_split(prepared_dir, "test")
    with np.load(predictions_path) as z:
        probs = z["probs"].astype(np.float32) / 255.0
        threshold = float(z["threshold"])
    images, truth = test["images"][:, 0], test["masks"][:, 0].astype(bool)
    preds = probs >= threshold
    curves = pd.read_csv(curves_tsv, sep="\t")
    per = pd.read_csv(per_image_csv)
    eval_dir = Path(eval_dir)
    dpi = params.dpi
    i0 = min(params.sample_index, len(images) - 1)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    _show(axes[0], images[i0], f"{test['ids'][i0]}")
    _show(axes[1], overlay(images[i0], truth[i0]), "infection mask overlaid")
    _save(fig, out_dir / "sample_overlay.png", dpi)
    written.append(out_dir / "sample_overlay.png")

    for metric, ylabel, name in (("loss", "loss", "loss_curves.png"), ("rmse", "pixel RMSE", "rmse_curves.png")):
        fig = curves_figure(curves, metric, ylabel)
        _save(fig, out_dir / name, dpi)
        written.append(out_dir / name)

    rows = _spread(len(images), params.gallery_size)
    fig, axes = plt.subplots(len(rows), 3, figsize=(8, 2.8 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        _show(axes[r, 0], images[i], f"input {test['ids'][i]}")
        _show(axes[r, 1], truth[i], "ground truth", cmap="gray", vmin=0, vmax=1)
        _show(axes[r, 2], probs[i], "predicted probability", cmap="magma", vmin=0, vmax=1)
    _save(fig, out_dir / "prediction_triplets.png", dpi)
    written.append(out_dir / "prediction_triplets.png")

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), squeeze=False)
    for c, i in enumerate(rows):
        _show(axes[0, c], overlay(images[i], preds[i], color=(1.0, 0.8, 0.0)), f"predicted infection {test['ids'][i]}")
    _save(fig, out_dir / "prediction_overlay.png", dpi)
    written.append(out_dir / "prediction_overlay.png")

    pr = pd.read_csv(eval_dir / "pr.csv").dropna()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(pr["recall"], pr["precision"])
    ax.set_xlabel("recall (pixels)")
    ax.set_ylabel("precision (pixels)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("precision-recall over thresholds", fontsize=9)
    _save(fig, out_dir / "pr_curve.png", dpi)
    written.append(out_dir / "pr_curve.png")

    cal = pd.read_csv(eval_dir / "calibration.csv").dropna()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(cal["mean_probability"], cal["fraction_infected"], "o-", label="model")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction of pixels infected")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("reliability diagram", fontsize=9)
    _save(fig, out_dir / "reliability.png", dpi)
    written.append(out_dir / "reliability.png")

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.hist(per["dice_tuned"].dropna(), bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    ax.set_xlabel("per-image Dice (tuned threshold)")
    ax.set_ylabel("images")
    _save(fig, out_dir / "dice_histogram.png", dpi)
    written.append(out_dir / "dice_histogram.png")

    scored = per["dice_tuned"].to_numpy()
    order = [i for i in np.argsort(np.nan_to_num(scored, nan=-1.0))[::-1] if np.isfinite(scored[i])]
    picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])] if order else []
    fig, axes = plt.subplots(max(len(picks), 1), 4, figsize=(10.5, 2.8 * max(len(picks), 1)), squeeze=False)
    for r, (label, i) in enumerate(picks):
        _show(axes[r, 0], images[i], f"{label}: {test['ids'][i]} Dice {scored[i]:.2f}")
        _show(axes[r, 1], overlay(images[i], truth[i], color=(0.1, 0.85, 0.2)), "truth")
        _show(axes[r, 2], overlay(images[i], preds[i], color=(1.0, 0.8, 0.0)), "prediction")
        _show(axes[r, 3], error_map(images[i], preds[i], truth[i]), "TP green, FP red, FN blue")
    _save(fig, out_dir / "gallery.png", dpi)
    written.append(out_dir / "gallery.png")
    return written


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))
