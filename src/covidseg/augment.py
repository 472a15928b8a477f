"""Batch augmentation on tensors, driven by an explicit generator (deterministic in the seed).

Geometric transforms (left-right flip, rotation, scale) move image and masks together;
intensity transforms (brightness, contrast, gamma) touch only the image. Applied to the
training split only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from covidseg.params import TrainParams


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, params: TrainParams, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch.

    Args:
        images: float (N, 1, H, W) in [0, 1].
        masks: float (N, K, H, W) in {0, 1} (infection, and lungs when K = 2).
        gen: CPU generator; the same state gives the same augmentation.
    Returns:
        images float (N, 1, H, W) in [0, 1], masks float (N, K, H, W) in {0, 1}.
    """
    n = images.shape[0]
    angle = _uniform(n, -params.rotate_deg, params.rotate_deg, gen) * math.pi / 180
    scale = _uniform(n, 1 - params.scale, 1 + params.scale, gen)
    flip = (torch.rand(n, generator=gen) < 0.5) if params.flip else torch.zeros(n, dtype=torch.bool)
    if params.rotate_deg > 0 or params.scale > 0 or params.flip:
        # Inverse map (output -> input coordinates): (1 / scale) * Rotation(angle) @ diag(flip, 1).
        f = torch.where(flip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = f * cos, -sin
        theta[:, 1, 0], theta[:, 1, 1] = f * sin, cos
        theta = theta.to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).to(masks.dtype)
    shape = (n, 1, 1, 1)
    brightness = _uniform(n, -params.brightness, params.brightness, gen).view(shape).to(images)
    contrast = _uniform(n, 1 - params.contrast, 1 + params.contrast, gen).view(shape).to(images)
    gamma = torch.exp(_uniform(n, -params.gamma, params.gamma, gen)).view(shape).to(images)
    mean = images.mean(dim=(2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean + brightness).clamp(0, 1)
    images = images.clamp_min(1e-6) ** gamma
    return images, masks
