"""Lung-region cascade: find the lungs on the whole X-ray, then segment infection in the lungs' box.

Infection lies inside the lungs, which fill only part of the image. The cascade spends the
network's pixels there: pass 1 runs the network on the whole image and reads its lung head;
the lungs' bounding box (plus a margin) is resampled to the full input size; pass 2 runs the
same network on that crop, and its infection logits are mapped back into the image frame
(pixels outside the box get a logit of :data:`OUTSIDE_LOGIT`, i.e. "not infected"). Same pixel
budget per pass, about 1.3-1.6x finer sampling of the lungs on chest X-rays, twice the
inference cost. Training shows the network both views (:func:`crop_batch`), so one set of
weights serves both passes.

Boxes are (N, 4) float tensors ``(x0, y0, x1, y1)`` in the normalised coordinates of
``torch.nn.functional.grid_sample`` with ``align_corners=False`` (-1 and 1 are the outer pixel
edges). All resampling is bilinear and built from plain tensor arithmetic plus ``grid_sample``,
so the cascade exports to ONNX (GridSample, opset >= 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MARGIN = 0.05  # added around the lung box on each side, as a fraction of the image side
MIN_SIDE = 0.25  # a box is never narrower than this fraction of the image (a stray lung blob)
OUTSIDE_LOGIT = -20.0  # infection logit outside the lung box: sigmoid(-20) ~ 2e-9
CROP_PROBABILITY = 0.5  # share of training images shown as lung crops (the rest whole)


def lung_boxes(lungs: torch.Tensor, margin: float | torch.Tensor = MARGIN) -> torch.Tensor:
    """Bounding boxes of lung masks, widened by ``margin`` and at least :data:`MIN_SIDE` wide.

    Args:
        lungs: bool (N, H, W), True where lung.
        margin: fraction of the image side added on each side; a float or a (N, 4) tensor
            (per image and side: left, top, right, bottom).
    Returns:
        float32 (N, 4) boxes ``(x0, y0, x1, y1)`` in [-1, 1]; the whole image where a mask is empty.
    """
    n, h, w = lungs.shape
    rows, cols = lungs.any(dim=2), lungs.any(dim=1)  # (N, H), (N, W)
    y0, y1 = _extent(rows)
    x0, x1 = _extent(cols)
    # pixel i spans [-1 + 2i/L, -1 + 2(i+1)/L] in normalised coordinates
    box = torch.stack([2 * x0 / w - 1, 2 * y0 / h - 1, 2 * (x1 + 1) / w - 1, 2 * (y1 + 1) / h - 1], dim=1)
    empty = ~rows.any(dim=1)
    box = torch.where(empty[:, None], torch.tensor([-1.0, -1.0, 1.0, 1.0], device=lungs.device), box)
    margin = torch.as_tensor(margin, dtype=torch.float32, device=lungs.device) * 2
    box = box + margin * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=lungs.device)
    return _at_least(box.clamp(-1.0, 1.0), 2 * MIN_SIDE)


def _extent(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index (float (N,)) where bool (N, L) ``hit`` is True; (L, -1) where none is."""
    length = hit.shape[1]
    index = torch.arange(length, device=hit.device, dtype=torch.float32).expand_as(hit)
    first = torch.where(hit, index, torch.full_like(index, length)).amin(dim=1)
    last = torch.where(hit, index, torch.full_like(index, -1)).amax(dim=1)
    return first, last


def _at_least(box: torch.Tensor, side: float) -> torch.Tensor:
    """Grow each box's too-short sides to ``side`` (normalised units) about its centre, kept inside [-1, 1]."""
    lo, hi = box[:, :2], box[:, 2:]
    grow = (side - (hi - lo)).clamp(min=0) / 2
    lo, hi = lo - grow, hi + grow
    shift = (-1 - lo).clamp(min=0) - (hi - 1).clamp(min=0)  # slide back inside the image
    return torch.cat([lo + shift, hi + shift], dim=1)


def _grid(scale: torch.Tensor, offset: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling grid (N, h, w, 2): output pixel centre u (normalised) reads input point scale * u + offset."""
    dev = scale.device
    ux = (torch.arange(w, device=dev, dtype=torch.float32) * 2 + 1) / w - 1
    uy = (torch.arange(h, device=dev, dtype=torch.float32) * 2 + 1) / h - 1
    gx = ux[None, None, :] * scale[:, 0, None, None] + offset[:, 0, None, None]
    gy = uy[None, :, None] * scale[:, 1, None, None] + offset[:, 1, None, None]
    return torch.stack([gx.expand(-1, h, w), gy.expand(-1, h, w)], dim=-1)


def _half_and_centre(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N, 4) as (x0, y0, x1, y1) -> their half-sides (N, 2) and centres (N, 2), normalised units."""
    return (boxes[:, 2:] - boxes[:, :2]) / 2, (boxes[:, 2:] + boxes[:, :2]) / 2


def crop(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample each image's box to ``size``: float (N, C, H, W) -> float (N, C, *size), bilinear."""
    half, centre = _half_and_centre(boxes)
    grid = _grid(half, centre, *size).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def paste(logits: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`crop` for logits: float (N, C, h, w) over each box -> float (N, C, *size) in the
    image frame, :data:`OUTSIDE_LOGIT` outside the box."""
    half, centre = _half_and_centre(boxes)
    grid = _grid(1 / half, -centre / half, *size).to(logits.dtype)
    sampled = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (grid.abs() <= 1).all(dim=-1)[:, None]
    return torch.where(inside, sampled, torch.full_like(sampled, OUTSIDE_LOGIT))


def crop_batch(
    images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training view for the cascade: about :data:`CROP_PROBABILITY` of a batch shown as lung crops.

    Args:
        images: float (N, 1, S, S) in [0, 1]; targets: float (N, 2, S, S), channel 1 the lungs.
        generator: CPU generator (which images, and each side's margin, uniform in [0, 2 * MARGIN]
            so the network sees boxes as loose and as tight as predicted lungs give).
    Returns:
        (images, targets) of the same shapes; the chosen images and their targets resampled
        to their true lungs' boxes.
    """
    if targets.shape[1] < 2:
        raise ValueError("the lung-region cascade needs the lung target (train.lung_aux_weight > 0)")
    n = images.shape[0]
    chosen = torch.rand(n, generator=generator) < CROP_PROBABILITY
    margins = torch.rand(n, 4, generator=generator) * 2 * MARGIN
    if not chosen.any():
        return images, targets
    idx = chosen.nonzero()[:, 0].to(images.device)
    boxes = lung_boxes(targets[idx, 1] > 0.5, margins[chosen].to(images.device))
    images, targets = images.clone(), targets.clone()
    images[idx] = crop(images[idx], boxes, images.shape[-2:])
    targets[idx] = crop(targets[idx], boxes, targets.shape[-2:])
    return images, targets


class LungCascade(nn.Module):
    """Two passes of one network: (N, 1, S, S) in [0, 1] -> logits (N, 2, S, S) like the network's own.

    Channel 0: infection logits from the crop pass, pasted back (OUTSIDE_LOGIT outside the box);
    channel 1: lung logits from the whole-image pass. ``net`` must have a lung head.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        if net.config.out_channels < 2:
            raise ValueError("the lung-region cascade needs a network with a lung head (out_channels 2)")
        self.net = net
        self.config = net.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole = self.net(x)
        size = tuple(x.shape[-2:])
        boxes = lung_boxes(whole[:, 1] > 0)  # lung logit > 0 <=> lung probability > 0.5
        region = crop(x, boxes, size).contiguous(memory_format=torch.channels_last)
        infection = paste(self.net(region)[:, :1].float(), boxes, size)
        return torch.cat([infection.to(whole.dtype), whole[:, 1:]], dim=1)
