"""Batch augmentation on tensors, driven by an explicit generator (deterministic in the seed).

Intensity transforms (brightness, contrast, gamma) touch only the image and are applied to the
uint8 grey levels through one 256-entry lookup table per image; geometric transforms (left-right
flip, rotation, scale) then move image and masks together with one shared sampling grid.
Applied to the training split only. It runs on the training loop's critical path, hence the
lookup tables (no per-pixel pow) and the broadcast grid (``F.affine_grid`` is a slow batched
matmul on the CPU); ``benchmarks/bench_train_step.py`` measures the loop with and without it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from covidseg.params import TrainParams


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def intensity_luts(images: torch.Tensor, params: TrainParams, gen: torch.Generator) -> torch.Tensor:
    """Per-image lookup tables float (N, 256) in [0, 1] for uint8 images (N, 1, H, W).

    Table i maps grey level g to ``clamp((g/255 - m_i) * contrast_i + m_i + brightness_i, 0, 1) ** gamma_i``
    with m_i the image's mean grey level in [0, 1].
    """
    n = images.shape[0]
    brightness = _uniform(n, -params.aug_brightness, params.aug_brightness, gen)[:, None]
    contrast = _uniform(n, 1 - params.aug_contrast, 1 + params.aug_contrast, gen)[:, None]
    gamma = torch.exp(_uniform(n, -params.aug_gamma, params.aug_gamma, gen))[:, None]
    mean = images.reshape(n, -1).float().mean(1, keepdim=True) / 255.0
    levels = torch.arange(256, dtype=torch.float32)[None, :] / 255.0
    return (((levels - mean) * contrast + mean + brightness).clamp(0, 1).clamp_min(1e-6) ** gamma).clamp(0, 1)


def sampling_grid(
    angle: torch.Tensor, scale: torch.Tensor, flip: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The ``grid_sample`` grid (N, H, W, 2) of a flip, then rotation by ``angle`` (radians) and zoom by ``scale``.

    Equal to ``F.affine_grid`` with align_corners=False, built by broadcasting (affine_grid's batched
    matmul over a homogeneous base grid is several times slower on the CPU).
    """
    # Inverse map (output -> input coordinates): (1 / scale) * Rotation(angle) @ diag(flip, 1).
    f = torch.where(flip, -1.0, 1.0)[:, None, None]
    cos, sin = (torch.cos(angle) / scale)[:, None, None], (torch.sin(angle) / scale)[:, None, None]
    xs = ((2 * torch.arange(width, dtype=torch.float32) + 1) / width - 1)[None, None, :]
    ys = ((2 * torch.arange(height, dtype=torch.float32) + 1) / height - 1)[None, :, None]
    gx = f * cos * xs - sin * ys
    gy = f * sin * xs + cos * ys
    return torch.stack((gx, gy), dim=-1)


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, params: TrainParams, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch.

    Args:
        images: uint8 (N, 1, H, W) grey levels 0..255.
        masks: float (N, K, H, W) in {0, 1} (infection, and lungs when K = 2).
        gen: CPU generator; the same state gives the same augmentation.
    Returns:
        images float (N, 1, H, W) in [0, 1], masks float (N, K, H, W) in {0, 1}.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"augment_batch expects uint8 images, got {images.dtype}")
    n, _, height, width = images.shape
    angle = _uniform(n, -params.aug_rotate_deg, params.aug_rotate_deg, gen) * math.pi / 180
    scale = _uniform(n, 1 - params.aug_scale, 1 + params.aug_scale, gen)
    flip = (torch.rand(n, generator=gen) < 0.5) if params.aug_flip else torch.zeros(n, dtype=torch.bool)
    luts = intensity_luts(images, params, gen)
    out = torch.gather(luts, 1, images.reshape(n, -1).long()).view(n, 1, height, width)
    if params.aug_rotate_deg > 0 or params.aug_scale > 0:
        grid = sampling_grid(angle, scale, flip, height, width)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # Nearest keeps masks binary and exactly aligned with the image's transform.
        masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    elif params.aug_flip:
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
    return out, masks
