"""Self-training's two steps between teacher and student: pseudo-labels and which of them to trust.

The method (``train.unlabeled``, run by :mod:`covidseg.training.run`) is self-training with hard
pseudo-labels and image-level selection, after ST++ (Yang et al., CVPR 2022: train a teacher on the
labelled films, label the unlabeled ones with it, keep the images whose prediction is stable, retrain
a student from scratch with strong augmentation on both). ST++ measures stability across the
teacher's checkpoints; here it is the agreement of the teacher's mask with its mask of the mirrored
film (mirrored back), which needs no checkpoints kept and costs one more forward pass. Chosen over
consistency training (Mean Teacher, FixMatch) because those run two networks or two views at every
training step for the whole run: on a CPU budget, one teacher pass over the unlabeled films is cheap
and the student's steps cost what supervised steps cost.
"""

from __future__ import annotations

import numpy as np
import torch

from covidseg.inference.calibration import Calibration
from covidseg.inference.forward import infection_logits, predict_all_logits, probabilities


def mask_dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-film Dice of two bool masks (M, S, S) -> float (M,); two empty masks agree fully (1.0)."""
    inter = (a & b).sum((1, 2)).astype(np.float64)
    total = a.sum((1, 2)).astype(np.float64) + b.sum((1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def pseudo_label(
    model: torch.nn.Module,
    calibration: Calibration,
    images: np.ndarray,
    device: torch.device,
    precision: str,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's hard infection labels and their flip stability for uint8 films (M, 1, S, S).

    Returns (uint8 (M, 1, S, S) in {0, 1}: the calibrated probability, averaged over the film and its
    mirror image as flip averaging does, at or above the calibration's threshold; float (M,) in [0, 1]:
    the Dice between the thresholded masks of the film and of its mirror image mirrored back).
    The lung gate and temperature of ``calibration`` apply to all three masks.
    """
    threshold = 0.5 if calibration.threshold is None else calibration.threshold
    if len(images) == 0:
        return np.zeros_like(images), np.zeros(0)
    plain = predict_all_logits(model, images, device, precision, batch_size)
    mirrored = predict_all_logits(model, np.ascontiguousarray(images[..., ::-1]), device, precision, batch_size)
    mirrored = mirrored.flip(dims=[3])

    def mask(logits: torch.Tensor) -> np.ndarray:
        return probabilities(infection_logits(logits, calibration.lung_gate), calibration.temperature) >= threshold

    labels = mask(0.5 * (plain + mirrored))
    return labels[:, None].astype(np.uint8), mask_dice(mask(plain), mask(mirrored))


def reliable_subset(stability: np.ndarray, keep: float) -> np.ndarray:
    """Sorted indices of the ``ceil(keep M)`` most stable of M films (ties broken by index, so it is deterministic)."""
    m = len(stability)
    n = int(np.ceil(keep * m - 1e-9))
    order = np.lexsort((np.arange(m), -np.asarray(stability, dtype=np.float64)))
    return np.sort(order[:n])
