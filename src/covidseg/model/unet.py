"""A plain U-Net: (N, 1, H, W) grey X-rays in [0, 1] -> (N, C, H, W) logits.

Channel 0 is the infection logit; with ``out_channels=2`` channel 1 is the lung logit
(an auxiliary task: infection lies inside the lungs). ``sigmoid`` turns logits into
probabilities. With ``downsample = k`` > 1 the U-Net works on the input average-pooled
by k and its logits are upsampled bilinearly back to (H, W): k^2 times less compute for
blob-like targets such as infection regions. H and W must be divisible by
``k * 2 ** (depth - 1)``.

With ``attention=True`` every skip connection passes through an additive attention gate
(Oktay et al., "Attention U-Net", MIDL 2018) before concatenation: the decoder's coarser,
more global features weight each skip pixel by alpha in (0, 1), so skip features in
irrelevant regions can be suppressed. With ``attention=False`` (the default) the network,
its parameter names and its outputs are those of the plain U-Net.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from covidseg.params import architecture_problems


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild the network (saved beside its weights)."""

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 16
    depth: int = 4
    downsample: int = 1
    attention: bool = False

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("in_channels and out_channels must be >= 1")
        if not isinstance(self.attention, bool):
            raise ValueError(f"attention must be true or false, got {self.attention!r}")
        problems = architecture_problems(self.base_channels, self.depth, self.downsample)
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> BatchNorm -> ReLU) twice; keeps H and W."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


def _conv1x1_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018) on a skip connection.

    alpha = sigmoid(psi(relu(W_g(g) + W_x(x)))) with W_g, W_x, psi 1x1 convolutions each
    followed by BatchNorm (as in the paper; a conv bias before BatchNorm would be redundant).
    The gate returns x * alpha.

    g: gating signal (N, c_gate, H, W), at the skip's resolution (the U-Net passes the
    transposed-conv output, so no resampling is needed); x: skip features (N, c_skip, H, W);
    alpha: (N, 1, H, W) in (0, 1).
    """

    def __init__(self, c_gate: int, c_skip: int, c_inter: int):
        super().__init__()
        for name, value in (("c_gate", c_gate), ("c_skip", c_skip), ("c_inter", c_inter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionGate: {name} must be an integer >= 1, got {value!r}")
        self.w_g = _conv1x1_bn(c_gate, c_inter)
        self.w_x = _conv1x1_bn(c_skip, c_inter)
        self.psi = _conv1x1_bn(c_inter, 1)

    def alpha(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """g (N, c_gate, H, W), x (N, c_skip, H, W) -> attention coefficients (N, 1, H, W) in (0, 1)."""
        if g.shape[0] != x.shape[0] or g.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"AttentionGate: gating signal {tuple(g.shape)} and skip {tuple(x.shape)} "
                "must share batch size, H and W"
            )
        return torch.sigmoid(self.psi(F.relu(self.w_g(g) + self.w_x(x))))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The gated skip: x * alpha, (N, c_skip, H, W)."""
        return x * self.alpha(g, x)


class Up(nn.Module):
    """Transposed-conv upsampling by 2, concatenation with the skip, then DoubleConv.

    With ``attention`` the skip is first multiplied by an :class:`AttentionGate` whose gating
    signal is the upsampled decoder features (intermediate width ``max(1, c_skip // 2)``).
    """

    def __init__(self, c_in: int, c_skip: int, c_out: int, attention: bool = False):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv = DoubleConv(c_out + c_skip, c_out)
        # Created last and only when asked, so the plain network draws the same random weights.
        if attention:
            self.gate = AttentionGate(c_out, c_skip, max(1, c_skip // 2))
        self.attention = attention

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x (N, c_in, H/2, W/2), skip (N, c_skip, H, W) -> (N, c_out, H, W)."""
        g = self.up(x)
        if self.attention:
            skip = self.gate(g, skip)
        return self.conv(torch.cat([g, skip], dim=1))


class UNet(nn.Module):
    """U-Net with ``depth`` resolution levels; widths base, 2*base, ... 2**(depth-1)*base."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth)]
        self.downs = nn.ModuleList()
        c = config.in_channels
        for w in widths:
            self.downs.append(DoubleConv(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i], config.attention) for i in reversed(range(config.depth - 1))
        )
        self.head = nn.Conv2d(widths[0], config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (N, in_channels, H, W) -> logits float (N, out_channels, H, W)."""
        factor = 2 ** (self.config.depth - 1) * self.config.downsample
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"input H, W {tuple(x.shape[-2:])} must be divisible by {factor}")
        k = self.config.downsample
        if k == 1:
            return self._unet(x)
        # Work at 1/k resolution (k^2 times fewer FLOPs), then return logits at full size.
        logits = self._unet(F.avg_pool2d(x, k))
        return F.interpolate(logits, scale_factor=k, mode="bilinear", align_corners=False)

    def _unet(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)
