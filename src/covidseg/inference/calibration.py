"""Calibration applied: how a model's logits become probabilities and a mask, as chosen on val.

A :class:`Calibration` (lung gating, temperature, threshold, flip averaging) is fitted by
training (:mod:`covidseg.training.calibration`) and saved in the model file;
:func:`calibrated_probabilities` applies it (``evaluate``, ``covidseg predict``, ONNX parity
checks), so every consumer runs the model exactly as it was calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from covidseg.inference.forward import infection_logits, predict_all_logits, probabilities


@dataclass(frozen=True)
class Calibration:
    """How to turn the model's logits into probabilities and a mask, as chosen on val by training.

    Saved in the model file (its keys are these field names); ``evaluate`` and ``covidseg predict``
    read it with :meth:`from_meta`, so both run the model exactly as it was calibrated.
    """

    threshold: float | None = None  # None: the file has no tuned threshold
    temperature: float = 1.0
    lung_gate: bool = False
    flip_tta: bool = False

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Calibration:
        """Read from a model file's metadata; keys it lacks keep the defaults above."""
        return cls(
            temperature=float(meta.get("temperature", 1.0)),
            threshold=float(meta["threshold"]) if "threshold" in meta else None,
            lung_gate=bool(meta.get("lung_gate", False)),
            flip_tta=bool(meta.get("flip_tta", False)),
        )


def calibrated_outputs(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    precision: str,
    calibration: Calibration,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Infection and lung probabilities for uint8 images (N, 1, S, S) from one pass of the model.

    Returns (float32 (N, S, S) infection probabilities with the flips, gating and temperature of
    ``calibration``; float32 (N, S, S) lung probabilities, sigmoid of the lung logit with the same
    flips and no temperature, or None for a model without a lung head). A pixel is lung where the
    lung probability is at least :data:`covidseg.masks.severity.LUNG_THRESHOLD`.
    """
    logits = predict_all_logits(model, images, device, precision, batch_size=batch_size, flip_tta=calibration.flip_tta)
    infection = probabilities(infection_logits(logits, calibration.lung_gate), calibration.temperature)
    lungs = probabilities(logits[:, 1]) if logits.shape[1] > 1 else None
    return infection, lungs


def calibrated_probabilities(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    precision: str,
    calibration: Calibration,
    batch_size: int = 16,
) -> np.ndarray:
    """float32 (N, S, S) probabilities for uint8 images (N, 1, S, S), with the flips, gating and temperature of
    ``calibration``: the infection half of :func:`calibrated_outputs`."""
    return calibrated_outputs(model, images, device, precision, calibration, batch_size)[0]
