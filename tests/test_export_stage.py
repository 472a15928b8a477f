"""The export stage's library function: model.pt + the test split -> model.onnx, parity on the real test images."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from covidseg.data.arrays import load_split
from covidseg.export.graph import ParityError
from covidseg.export.stage import export_stage
from covidseg.inference.onnx_runtime import OnnxPredictor
from covidseg.model.checkpoint import save_model
from covidseg.model.unet import UNet, UNetConfig
from covidseg.params import ExportParams, ParamsError, from_dict

META = {
    "threshold": 0.4,
    "temperature": 1.7,
    "lung_gate": True,
    "flip_tta": True,
    "size": 64,
    "provenance": {"data_source": "synthetic", "synthetic": True},
}


@pytest.fixture
def model_pt(tmp_path):
    torch.manual_seed(0)
    net = UNet(UNetConfig(out_channels=2, base_channels=4, depth=2, downsample=1)).eval()
    path = tmp_path / "model.pt"
    save_model(path, net, META)
    return path


def test_export_writes_a_calibrated_graph_checked_on_every_test_image(model_pt, tiny_prepared, tmp_path):
    onnx_path, summary_path = tmp_path / "models" / "model.onnx", tmp_path / "export.json"
    s = export_stage(model_pt, tiny_prepared, onnx_path, ExportParams(), summary_path=summary_path)
    n_test = len(load_split(tiny_prepared, "test")["images"])
    assert s["parity_images"] == n_test and 0 <= s["parity_max_abs_diff"] <= 1e-4 and s["opset"] == 18
    assert json.loads(summary_path.read_text()) == s
    predictor = OnnxPredictor(onnx_path)
    assert predictor.calibration == {"temperature": 1.7, "lung_gate": True, "flip_tta": True, "threshold": 0.4}
    assert predictor.size == 64
    assert predictor.metadata["covidseg.source_model_sha256"] == hashlib.sha256(model_pt.read_bytes()).hexdigest()
    assert json.loads(predictor.metadata["covidseg.provenance"]) == META["provenance"]
    x = np.zeros((5, 1, 64, 64), np.uint8)
    assert predictor.predict(x).shape == (5, 64, 64)  # the batch axis stays dynamic


def test_parity_images_limits_the_check(model_pt, tiny_prepared, tmp_path):
    s = export_stage(model_pt, tiny_prepared, tmp_path / "m.onnx", ExportParams(opset=17, parity_images=2))
    assert s["parity_images"] == 2 and s["opset"] == 17


def test_parity_failure_fails_naming_the_file_and_the_difference_and_keeps_the_old_file(
    model_pt, tiny_prepared, tmp_path
):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"previous")
    with pytest.raises(
        ParityError, match=r"model\.onnx: ONNX probabilities differ from torch's by [0-9.e+-]+ \(max abs"
    ):
        export_stage(model_pt, tiny_prepared, onnx_path, ExportParams(parity_tolerance=1e-30))
    assert onnx_path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.onnx")] == []


def test_test_images_of_another_size_are_refused_by_name(model_pt, tiny_prepared, tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    test = load_split(tiny_prepared, "test")
    np.savez(prepared / "test.npz", **{**test, "images": test["images"][:, :, :32, :32]})
    with pytest.raises(ValueError, match=r"test\.npz: images \(1, 32, 32\) do not fit .*model\.pt"):
        export_stage(model_pt, prepared, tmp_path / "m.onnx", ExportParams())
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"opset": 16}, "opset must be >= 17"),
        ({"parity_tolerance": 0.0}, "parity_tolerance"),
        ({"parity_images": -1}, "parity_images"),
    ],
)
def test_bad_export_params_are_refused(raw, message):
    with pytest.raises(ParamsError, match=message):
        from_dict(ExportParams, "export", raw)
