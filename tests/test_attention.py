"""Attention gates on the U-Net's skip connections (``train.attention``): shapes, the plain network unchanged, training, ONNX."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from covidseg.export.graph import export_onnx, parity
from covidseg.export.stage import export_stage
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.model.checkpoint import load_model, save_model
from covidseg.model.unet import AttentionGate, DoubleConv, UNet, UNetConfig
from covidseg.params import ExportParams, TrainParams

from helpers import train_tiny


class _OldUp(nn.Module):
    """The decoder block as it was before attention gates existed (reference for the unchanged default)."""

    def __init__(self, c_in, c_skip, c_out):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv = DoubleConv(c_out + c_skip, c_out)

    def forward(self, x, skip):
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class _OldUNet(nn.Module):
    """The U-Net as it was before attention gates existed (same modules, same creation order)."""

    def __init__(self, out_channels, base_channels, depth):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth)]
        self.downs = nn.ModuleList()
        c = 1
        for w in widths:
            self.downs.append(DoubleConv(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(_OldUp(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


@pytest.mark.parametrize("depth", [3, 4, 5])
@pytest.mark.parametrize("downsample", [1, 2])
def test_forward_shape_with_attention(depth, downsample):
    torch.manual_seed(0)
    net = UNet(UNetConfig(out_channels=2, base_channels=4, depth=depth, downsample=downsample, attention=True)).eval()
    gates = [m for m in net.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == depth - 1  # one per skip connection
    x = torch.rand(2, 1, 64, 64)
    out = net(x)
    assert out.shape == (2, 2, 64, 64) and torch.isfinite(out).all()


def test_gate_alpha_is_a_probability_map_and_scales_the_skip():
    torch.manual_seed(0)
    gate = AttentionGate(c_gate=8, c_skip=6, c_inter=3).train()  # batch statistics: psi's output is spread out
    g, x = torch.randn(2, 8, 16, 12), torch.randn(2, 6, 16, 12)
    alpha = gate.alpha(g, x)
    assert alpha.shape == (2, 1, 16, 12)
    assert (alpha > 0).all() and (alpha < 1).all() and alpha.std() > 0.05
    torch.testing.assert_close(gate(g, x), x * alpha)


@pytest.mark.parametrize("bad", [{"c_gate": 0}, {"c_skip": -1}, {"c_inter": 0}, {"c_inter": 2.0}])
def test_gate_rejects_bad_widths(bad):
    kwargs = {"c_gate": 4, "c_skip": 4, "c_inter": 2, **bad}
    with pytest.raises(ValueError, match=f"AttentionGate: {next(iter(bad))} must be an integer >= 1"):
        AttentionGate(**kwargs)


def test_gate_rejects_mismatched_resolutions():
    gate = AttentionGate(4, 4, 2)
    with pytest.raises(ValueError, match="must share batch size, H and W"):
        gate(torch.rand(1, 4, 8, 8), torch.rand(1, 4, 16, 16))


def test_config_rejects_a_non_bool_attention():
    with pytest.raises(ValueError, match="attention must be true or false"):
        UNetConfig(attention="yes")


@pytest.mark.parametrize("depth, out_channels", [(2, 1), (4, 2)])
def test_without_attention_the_network_is_the_plain_unet_bit_for_bit(depth, out_channels):
    torch.manual_seed(3)
    old = _OldUNet(out_channels, 4, depth).eval()
    torch.manual_seed(3)
    new = UNet(UNetConfig(out_channels=out_channels, base_channels=4, depth=depth, attention=False)).eval()
    old_state, new_state = old.state_dict(), new.state_dict()
    assert list(new_state) == list(old_state)  # same names, same order
    for key in old_state:
        assert torch.equal(new_state[key], old_state[key]), key  # same seed -> same weights
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(new(x), old(x))
    assert UNetConfig(out_channels=out_channels, base_channels=4, depth=depth) == new.config  # default off


def test_attention_adds_only_gate_parameters_and_little_compute():
    plain = UNet(UNetConfig(base_channels=16, depth=4))
    gated = UNet(UNetConfig(base_channels=16, depth=4, attention=True))
    plain_keys, gated_keys = set(plain.state_dict()), set(gated.state_dict())
    assert plain_keys < gated_keys
    assert all(".gate." in k for k in gated_keys - plain_keys)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_gated = sum(p.numel() for p in gated.parameters())
    assert 1.0 < n_gated / n_plain < 1.05


def test_model_file_round_trip_with_attention_and_old_files_without_the_key(tmp_path):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=3, attention=True)).eval()
    save_model(tmp_path / "m.pt", net, {"size": 32})
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.config.attention is True
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(loaded(x), net(x))
    # A model file written before the key existed (no "attention" in its config) loads as the plain U-Net.
    plain = UNet(UNetConfig(base_channels=4, depth=3)).eval()
    save_model(tmp_path / "old.pt", plain, {"size": 32})
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    del payload["config"]["attention"]
    torch.save(payload, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert old.config.attention is False
    torch.testing.assert_close(old(x), plain(x))


def test_onnx_export_with_attention_matches_torch(tmp_path):
    torch.manual_seed(0)
    net = UNet(UNetConfig(out_channels=2, base_channels=4, depth=3, downsample=2, attention=True))
    for m in net.modules():  # random BatchNorm statistics so eval-mode normalisation (gates included) is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    cal = Calibration(threshold=0.4, temperature=1.3, lung_gate=True)
    path = export_onnx(net, tmp_path / "m.onnx", 32, {"covidseg.source": "tests"}, calibration=cal)
    x = np.random.default_rng(1).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    want = lambda a: calibrated_probabilities(net, a, torch.device("cpu"), "fp32", cal)  # noqa: E731
    assert parity(want, path, x) < 1e-4


def test_tiny_training_with_attention_saves_reloads_and_exports(tiny_prepared, tmp_path):
    params = dataclasses.replace(
        TrainParams(), epochs=1, batch_size=4, base_channels=4, depth=3, downsample=1, lr=1e-3, attention=True
    )
    train_tiny(tiny_prepared, tmp_path, params)
    model, meta = load_model(tmp_path / "model.pt")
    assert model.config.attention is True
    assert any(".gate." in k for k in model.state_dict())
    summary = export_stage(tmp_path / "model.pt", tiny_prepared, tmp_path / "model.onnx", ExportParams())
    assert summary["parity_max_abs_diff"] <= 1e-4 and (tmp_path / "model.onnx").exists()
