import pytest
import torch

from covidseg.model import UNet, UNetConfig
from covidseg.modelio import load_model, save_model


@pytest.mark.parametrize("depth, downsample, out_channels", [(1, 1, 1), (3, 1, 2), (4, 2, 1), (3, 4, 2)])
def test_output_has_input_size(depth, downsample, out_channels):
    net = UNet(UNetConfig(out_channels=out_channels, base_channels=4, depth=depth, downsample=downsample)).eval()
    x = torch.rand(2, 1, 64, 64)
    assert net(x).shape == (2, out_channels, 64, 64)


def test_input_size_must_divide():
    net = UNet(UNetConfig(base_channels=4, depth=4, downsample=2))
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 40, 40))


@pytest.mark.parametrize("kwargs", [{"base_channels": 2}, {"depth": 0}, {"depth": 7}, {"downsample": 3}, {"out_channels": 0}])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        UNetConfig(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=2)).eval()
    path = tmp_path / "m.pt"
    save_model(path, net, {"threshold": 0.4, "temperature": 1.5, "size": 32})
    loaded, meta = load_model(path)
    assert meta == {"threshold": 0.4, "temperature": 1.5, "size": 32}
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(loaded(x.contiguous(memory_format=torch.channels_last)), net(x))


def test_loading_a_non_model_names_the_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt: not a covidseg model file"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt: model file not found"):
        load_model(tmp_path / "missing.pt")
