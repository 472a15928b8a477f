"""Exponential moving average of a model's weights, evaluated and saved in place of the raw weights.

Averaging the weights over the last few hundred optimiser steps smooths out the step-to-step
noise of a small-batch run (Polyak averaging; timm's ``ModelEmaV2``); the raw model keeps
training untouched, so the training curves do not change, only what is validated and kept.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """A frozen copy of ``model`` whose weights follow ``w_avg <- d * w_avg + (1 - d) * w``.

    ``d = min(decay, (1 + n) / (10 + n))`` at update n (0-based), so the first averages are not
    dominated by the random initial weights. Floating-point buffers (BatchNorm running mean and
    variance) are averaged the same way; integer buffers (``num_batches_tracked``) are copied.
    With decay 0.999 the average spans roughly the last 1000 steps.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def rate(self) -> float:
        """The decay d the next update will use."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average one step towards ``model`` (same architecture); call after each optimiser step."""
        d = self.rate()
        averaged, current = [], []
        for avg, src in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                averaged.append(avg)
                current.append(src.detach().to(avg.dtype))
            else:
                avg.copy_(src)
        torch._foreach_lerp_(averaged, current, 1.0 - d)  # avg + (1 - d) * (src - avg)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.model.load_state_dict(state["model"])
