import pytest
import torch

from covidseg.model.checkpoint import load_model, save_model
from covidseg.model.unet import UNet, UNetConfig


@pytest.mark.parametrize("depth, downsample, out_channels", [(1, 1, 1), (3, 1, 2), (4, 2, 1), (3, 4, 2)])
def test_output_has_input_size(depth, downsample, out_channels):
    net = UNet(UNetConfig(out_channels=out_channels, base_channels=4, depth=depth, downsample=downsample)).eval()
    x = torch.rand(2, 1, 64, 64)
    assert net(x).shape == (2, out_channels, 64, 64)


def test_input_size_must_divide():
    net = UNet(UNetConfig(base_channels=4, depth=4, downsample=2))
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 40, 40))


@pytest.mark.parametrize(
    "kwargs", [{"base_channels": 2}, {"depth": 0}, {"depth": 7}, {"downsample": 3}, {"out_channels": 0}]
)
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


def test_same_weights_give_the_same_bytes_whatever_the_path(tmp_path):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=2)).eval()
    extra = {"threshold": 0.4, "size": 32, "provenance": {"data_source": "synthetic"}}
    save_model(tmp_path / "a.pt", net, extra)
    (tmp_path / "elsewhere").mkdir()
    save_model(tmp_path / "elsewhere" / "model.pt", net, extra)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "elsewhere" / "model.pt").read_bytes()
    assert (
        b"elsewhere" not in (tmp_path / "a.pt").read_bytes()
        and str(tmp_path).encode() not in (tmp_path / "a.pt").read_bytes()
    )


def _payload(tmp_path, **changes):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=2))
    payload = {
        "format": "covidseg-model",
        "format_version": 2,
        "config": net.config.to_dict(),
        "state_dict": net.state_dict(),
        "size": 32,
    }
    payload.update(changes)
    payload = {k: v for k, v in payload.items() if v is not None}
    path = tmp_path / "m.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": 3}, r"m.pt: model file format version 3, this covidseg reads version 2; retrain it"),
        (
            {"format": None, "format_version": None},
            r"m.pt: model file format version 1, this covidseg reads version 2; retrain",
        ),
        ({"format": "something-else"}, r"m.pt: not a covidseg model file \(format 'something-else'\)"),
        (
            {
                "config": {
                    "in_channels": 1,
                    "out_channels": 1,
                    "base_channels": 4,
                    "depth": 2,
                    "downsample": 1,
                    "dropout": 0.1,
                }
            },
            r"m.pt: unknown model config key\(s\) dropout; retrain it with `dvc repro train`",
        ),
    ],
)
def test_a_file_of_another_format_gets_a_short_message(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_model(_payload(tmp_path, **changes))


def test_a_pickle_with_objects_is_refused_without_torchs_unsafe_advice(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"config": UNetConfig(), "state_dict": {}}, path)  # a dataclass object: weights_only refuses it
    with pytest.raises(ValueError) as info:
        load_model(path)
    text = str(info.value)
    assert text.startswith(f"{path}: not a covidseg model file") and "weights_only" not in text and len(text) < 300
