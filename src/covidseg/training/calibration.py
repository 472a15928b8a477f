"""Calibration fitted: on the val split, after training, choose how the model's logits become a mask.

:func:`fit_calibration` (run by training on the kept weights) chooses lung gating (only with a
lung head), then a temperature (:func:`tune_temperature`), then a threshold
(:func:`tune_threshold`); the result is a :class:`covidseg.inference.calibration.Calibration`,
saved in the model file and applied by :mod:`covidseg.inference.calibration`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from covidseg.inference.calibration import Calibration
from covidseg.inference.forward import predict_logits
from covidseg.masks.counts import confusion, dice, iou, squared_error_sum

_LOG = logging.getLogger(__name__)

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.025), 3)
TEMPERATURES = np.round(np.exp(np.linspace(np.log(0.1), np.log(10.0), 81)), 4)  # ratio 1.059 per step; includes 1


def _overlap_sums(prob: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """Sums of per-image Dice and IoU at ``threshold`` and the number of images scored (empty-truth rule)."""
    counts = confusion(prob >= threshold, truth)
    d, j = dice(counts), iou(counts)
    return {"dice_sum": float(np.nansum(d)), "iou_sum": float(np.nansum(j)), "scored": float(np.sum(~np.isnan(d)))}


def val_scores(
    logits: torch.Tensor, masks: np.ndarray, threshold: float = 0.5, temperature: float = 1.0
) -> dict[str, float]:
    """Per-image Dice/IoU sums (empty-truth rule of :mod:`covidseg.masks.counts`), and sums for RMSE.

    logits: float (N, S, S); masks: uint8 (N, 1, S, S) in {0, 1}. Returns ``dice_sum``, ``iou_sum``,
    ``scored`` (images with a defined Dice), ``sse`` (squared error of the probabilities) and ``pixels``.
    """
    prob = torch.sigmoid(logits / temperature).numpy()
    truth = masks[:, 0].astype(bool)
    return _overlap_sums(prob, truth, threshold) | {
        "sse": squared_error_sum(prob, truth),
        "pixels": float(truth.size),
    }


def tune_threshold(logits: torch.Tensor, masks: np.ndarray, temperature: float) -> float:
    """The threshold on THRESHOLDS that maximises mean per-image val Dice (ties: the one nearest 0.5)."""
    prob = torch.sigmoid(logits / temperature).numpy()  # once, not once per threshold
    truth = masks[:, 0].astype(bool)
    best, best_t = -1.0, 0.5
    for t in sorted(THRESHOLDS, key=lambda t: abs(t - 0.5)):
        s = _overlap_sums(prob, truth, float(t))
        score = s["dice_sum"] / max(s["scored"], 1)
        if score > best + 1e-9:
            best, best_t = score, float(t)
    return best_t


def tune_temperature(logits: torch.Tensor, masks: np.ndarray) -> float:
    """Temperature T on TEMPERATURES minimising val BCE of sigmoid(logit / T) (Guo et al. 2017).

    A result at either end of the grid (0.1 or 10) means the optimum may lie beyond it: see
    :func:`at_grid_edge`.
    """
    sub = logits[:, ::3, ::3].reshape(-1).double()
    truth = torch.from_numpy(masks[:, 0, ::3, ::3].reshape(-1).astype(np.float64))
    losses = [F.binary_cross_entropy_with_logits(sub / t, truth).item() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def at_grid_edge(temperature: float) -> bool:
    """Whether a tuned temperature is the first or last grid value (the true optimum may lie outside)."""
    return temperature in (float(TEMPERATURES[0]), float(TEMPERATURES[-1]))


def fit_calibration(
    model: torch.nn.Module,
    val_images: np.ndarray,
    val_masks: np.ndarray,
    device: torch.device,
    precision: str,
    batch_size: int,
    flip_tta: bool,
    temperature_scaling: bool,
    with_lung_head: bool,
) -> tuple[Calibration, dict[str, float]]:
    """Choose on val: lung gating (with a lung head), then temperature, then threshold.

    val_images: uint8 (N, 1, S, S); val_masks: uint8 (N, 1, S, S) in {0, 1}. Returns (the
    calibration, :func:`val_scores` with it). Gating is kept only if it raises mean per-image val
    Dice at its own tuned threshold. A temperature at the edge of its grid is a warning on this module's logger.
    """
    best = None
    for gate in (False, True) if with_lung_head else (False,):
        logits = predict_logits(
            model, val_images, device, precision, batch_size=batch_size, flip_tta=flip_tta, lung_gate=gate
        )
        temperature = tune_temperature(logits, val_masks) if temperature_scaling else 1.0
        if temperature_scaling and at_grid_edge(temperature):
            _LOG.warning(
                f"the tuned temperature {temperature:g} is at the edge of its grid "
                f"[{TEMPERATURES[0]:g}, {TEMPERATURES[-1]:g}]; the best value may lie outside, so val "
                "probabilities stay miscalibrated (recorded as temperature_at_grid_edge in the metrics)"
            )
        threshold = tune_threshold(logits, val_masks, temperature)
        scores = val_scores(logits, val_masks, threshold, temperature)
        dice = scores["dice_sum"] / max(scores["scored"], 1)
        if best is None or dice > best[0] + 1e-9:
            best = (dice, Calibration(threshold, temperature, gate, flip_tta), scores)
    return best[1], best[2]
