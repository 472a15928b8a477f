"""The model forward pass over uint8 image arrays in batches: logits and probabilities.

Applying a fitted calibration is :mod:`covidseg.inference.calibration`.
"""

from __future__ import annotations

import numpy as np
import torch

from covidseg.device import autocast


@torch.no_grad()
def predict_all_logits(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 16,
    flip_tta: bool = False,
) -> torch.Tensor:
    """Every output channel's logits for uint8 images.

    Args:
        images: uint8 (N, 1, S, S) grey levels 0..255.
        flip_tta: also predict the left-right mirrored image and average the logits.
    Returns:
        float32 CPU tensor (N, C, S, S): channel 0 infection, channel 1 (with a lung head) lungs.
    """
    model.eval()
    images = torch.as_tensor(images)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, torch.float32).div_(255.0)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x).float()
            if flip_tta:
                logits = 0.5 * (logits + model(torch.flip(x, dims=[3])).float().flip(dims=[3]))
        out.append(logits.cpu())
    channels = getattr(getattr(model, "config", None), "out_channels", 1)
    return torch.cat(out) if out else torch.zeros((0, channels) + tuple(images.shape[2:]))


def infection_logits(logits: torch.Tensor, lung_gate: bool = False) -> torch.Tensor:
    """(N, S, S) infection logits from (N, C, S, S) outputs; ``lung_gate`` (with a lung channel) caps each
    pixel's infection logit by its lung logit, so no pixel is more likely infected than it is likely lung."""
    if lung_gate and logits.shape[1] > 1:
        return torch.minimum(logits[:, 0], logits[:, 1])
    return logits[:, 0]


def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 16,
    flip_tta: bool = False,
    lung_gate: bool = False,
) -> torch.Tensor:
    """float32 CPU tensor (N, S, S) of infection logits for uint8 images (N, 1, S, S).

    See :func:`predict_all_logits` (``flip_tta``) and :func:`infection_logits` (``lung_gate``).
    """
    return infection_logits(predict_all_logits(model, images, device, precision, batch_size, flip_tta), lung_gate)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """float32 (N, S, S) probabilities in [0, 1]: sigmoid(logits / temperature)."""
    return torch.sigmoid(logits / temperature).numpy().astype(np.float32)
