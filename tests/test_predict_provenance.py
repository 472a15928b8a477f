"""`covidseg predict` states what the model was trained on and warns about models it should not trust."""

import pytest
import torch

from covidseg.model.checkpoint import save_model
from covidseg.model.unet import UNet, UNetConfig

from helpers import FAST_PREDICT_FLAGS, invoke_predict, make_predict_model, save_image

PROVENANCE = {
    "data_source": "covidqu.zip",
    "synthetic": False,
    "split_counts": {"train": 10, "val": 4, "test": 4},
    "train_images": 10,
    "val_dice": 0.771,
    "package_version": "0.1.0",
    "code_hash": "ab" * 32,
}


def _model(path, out_channels=2, **provenance):
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=2, out_channels=out_channels)).eval()
    with torch.no_grad():  # nothing infected, everything lung: no warning about the predictions themselves
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([-3.0, 3.0][:out_channels]))
    save_model(path, net, {"threshold": 0.5, "size": 32, "provenance": PROVENANCE | provenance})
    return path


def test_provenance_is_printed_and_a_real_model_gets_no_warning(tmp_path):
    src = save_image(tmp_path / "x.png", "grey", 40, 30)
    result = invoke_predict(src, "--model", _model(tmp_path / "m.pt"), "--out", tmp_path / "out", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    assert (
        "model: trained on covidqu.zip (train 10, val 4, test 4; 10 training images), val Dice 0.771" in result.stderr
    )
    assert "training code abababababab" in result.stderr and "WARNING" not in result.stderr
    quiet = invoke_predict(src, "--model", tmp_path / "m.pt", "--out", tmp_path / "out", "--quiet", *FAST_PREDICT_FLAGS)
    assert "model: trained on" not in quiet.stderr


def test_a_synthetic_model_is_warned_about_even_when_quiet(tmp_path):
    src = save_image(tmp_path / "x.png", "grey", 40, 30)
    model = _model(tmp_path / "m.pt", data_source="synthetic", synthetic=True)
    result = invoke_predict(src, "--model", model, "--out", tmp_path / "out", "--quiet", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    assert "WARNING: this model was trained on the built-in SYNTHETIC data set" in result.stderr


@pytest.mark.parametrize("bias, warned", [(20.0, True), (-20.0, False)])
def test_an_image_marked_almost_all_infected_is_warned_about(tmp_path, bias, warned):
    src = save_image(tmp_path / "x.png", "grey", 40, 30)
    result = invoke_predict(
        src, "--model", make_predict_model(tmp_path / "m.pt", bias=bias), "--out", tmp_path / "out", *FAST_PREDICT_FLAGS
    )
    assert result.exit_code == 0, result.output
    assert ("WARNING: 1 image(s) have more than 90% of their pixels marked infected (x)" in result.stderr) is warned


def test_a_model_file_of_another_version_exits_2_with_a_short_message(tmp_path):
    src = save_image(tmp_path / "x.png", "grey", 20, 20)
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=2))
    old = tmp_path / "old.pt"  # the version-1 layout: no format keys
    torch.save({"config": net.config.to_dict(), "state_dict": net.state_dict(), "size": 32}, old)
    objects = tmp_path / "objects.pt"
    torch.save({"config": net.config, "state_dict": {}}, objects)
    for path, words in (
        (old, "model file format version 1, this covidseg reads version 2; retrain"),
        (objects, "not a covidseg model file"),
    ):
        result = invoke_predict(src, "--model", path, "--out", tmp_path / "out", *FAST_PREDICT_FLAGS)
        assert result.exit_code == 2
        assert str(path) in result.stderr and words in result.stderr and "weights_only" not in result.stderr


def test_a_model_without_a_lung_head_is_warned_about_and_severity_stays_empty(tmp_path):
    from covidseg.inference.predict import read_csv

    src = save_image(tmp_path / "x.png", "grey", 40, 30)
    result = invoke_predict(
        src, "--model", _model(tmp_path / "m.pt", out_channels=1), "--out", tmp_path / "out", "-q", *FAST_PREDICT_FLAGS
    )
    assert result.exit_code == 0, result.output
    assert "no lung head" in result.stderr and "lung_aux_weight" in result.stderr
    row = read_csv(tmp_path / "out" / "predictions.csv")[0]
    assert row["extent_score"] == "" and row["right_lung_infected_pct"] == "" and row["status"] == "ok"
    assert not (tmp_path / "out" / "lungs").exists() or not any((tmp_path / "out" / "lungs").iterdir())
