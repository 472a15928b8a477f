"""An ensemble of K U-Nets of one architecture whose probabilities are averaged.

Two ways make one: ``train.snapshots: K`` (K >= 2) keeps the weights of the last K epochs of one
run (a snapshot ensemble), and ``train.members: K`` trains K independent runs with K seeds
(covidseg.training.run). Either saves this module instead of one network. It takes and returns what a :class:`~covidseg.model.unet.UNet`
does, (N, 1, H, W) -> logits (N, C, H, W), and exposes the same ``config``, so calibration, lung
gating, flip averaging, ONNX export, prediction and severity use it unchanged; it costs K times
a U-Net's inference time and model size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from covidseg.model.unet import UNet, UNetConfig


def mean_probability_logits(logits: torch.Tensor) -> torch.Tensor:
    """logit(mean_k sigmoid(logits[k])): (K, N, C, H, W) -> float32 (N, C, H, W).

    Computed in log space, with no clamping: log p = logsumexp_k(-softplus(-z_k)) - log K and
    log(1 - p) = logsumexp_k(-softplus(z_k)) - log K, so the result is log p - log(1 - p). It stays
    finite and exact where sigmoid saturates in fp32 (|z| > ~17), and with K = 1 it is z itself
    (up to rounding).
    """
    z = logits.float()
    log_k = math.log(z.shape[0])
    log_p = torch.logsumexp(-F.softplus(-z), dim=0) - log_k
    log_q = torch.logsumexp(-F.softplus(z), dim=0) - log_k
    return log_p - log_q


class UNetEnsemble(nn.Module):
    """K networks of one :class:`UNetConfig` (epochs of one run or independent runs); forward averages their
    per-channel probabilities.

    ``members``: the K U-Nets (``nn.ModuleList``, so ``state_dict`` keys are ``members.<k>.<name>``).
    ``config``: the members' UNetConfig, so code reading ``model.config.out_channels`` works on it.
    """

    def __init__(self, config: UNetConfig, k: int):
        super().__init__()
        if k < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {k}")
        self.config = config
        self.members = nn.ModuleList(UNet(config) for _ in range(k))

    @classmethod
    def from_state_dicts(cls, config: UNetConfig, states: list[dict[str, torch.Tensor]]) -> UNetEnsemble:
        """An ensemble whose member k has the U-Net weights ``states[k]`` (oldest first)."""
        ensemble = cls(config, len(states))
        for member, state in zip(ensemble.members, states):
            member.load_state_dict(state)
        return ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (N, in_channels, H, W) -> float32 logits (N, out_channels, H, W) of the mean probability."""
        return mean_probability_logits(torch.stack([m(x).float() for m in self.members]))
