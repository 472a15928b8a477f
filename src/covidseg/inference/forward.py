"""Run a trained model over uint8 image arrays in batches and return probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from covidseg.device import autocast


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 16,
    flip_tta: bool = False,
    lung_gate: bool = False,
) -> torch.Tensor:
    """Infection logits for uint8 images.

    Args:
        images: uint8 (N, 1, S, S) grey levels 0..255.
        flip_tta: also predict the left-right mirrored image and average the logits.
        lung_gate: with a lung output (channel 1), cap the infection logit by the lung logit, so no
            pixel is more likely infected than it is likely lung (infection lies inside the lungs).
    Returns:
        float32 CPU tensor (N, S, S) of infection logits (channel 0 of the model output).
    """
    model.eval()
    images = torch.as_tensor(images)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device, torch.float32).div_(255.0)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x).float()
            if flip_tta:
                logits = 0.5 * (logits + model(torch.flip(x, dims=[3])).float().flip(dims=[3]))
        if lung_gate and logits.shape[1] > 1:
            out.append(torch.minimum(logits[:, 0], logits[:, 1]).cpu())
        else:
            out.append(logits[:, 0].cpu())
    return torch.cat(out) if out else torch.zeros((0,) + tuple(images.shape[2:]))


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """float32 (N, S, S) probabilities in [0, 1]: sigmoid(logits / temperature)."""
    return torch.sigmoid(logits / temperature).numpy().astype(np.float32)


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
    def from_meta(cls, meta: dict[str, Any]) -> "Calibration":
        """Read from a model file's metadata; keys it lacks keep the defaults above."""
        return cls(temperature=float(meta.get("temperature", 1.0)),
                   threshold=float(meta["threshold"]) if "threshold" in meta else None,
                   lung_gate=bool(meta.get("lung_gate", False)), flip_tta=bool(meta.get("flip_tta", False)))


def calibrated_probabilities(model: torch.nn.Module, images: np.ndarray | torch.Tensor, device: torch.device,
                             precision: str, calibration: Calibration, batch_size: int = 16) -> np.ndarray:
    """float32 (N, S, S) probabilities for uint8 images (N, 1, S, S), with the flips, gating and temperature of ``calibration``."""
    logits = predict_logits(model, images, device, precision, batch_size=batch_size,
                            flip_tta=calibration.flip_tta, lung_gate=calibration.lung_gate)
    return probabilities(logits, calibration.temperature)
