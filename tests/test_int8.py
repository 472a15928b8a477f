"""The int8 model beside the fp32 ONNX: what is quantised, that the covidseg metadata survives, the tie gate, and
the export stage keeping the file only when it ties."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import covidseg.export.int8 as int8_mod
import covidseg.export.stage as stage_mod
from covidseg.data.arrays import load_split
from covidseg.export.int8 import QUANTIZATION_KEY, Int8Mismatch, compare, quantize
from covidseg.export.stage import export_stage
from covidseg.inference.onnx_runtime import OnnxPredictor
from covidseg.model.checkpoint import save_model
from covidseg.model.unet import UNet, UNetConfig
from covidseg.params import ExportParams

META = {"threshold": 0.5, "temperature": 1.0, "lung_gate": False, "flip_tta": True, "size": 64}


def _fp32_onnx(tmp_path, tiny_prepared, seed=0, name="m"):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(out_channels=2, base_channels=4, depth=3)).eval()
    save_model(tmp_path / f"{name}.pt", net, META)
    export_stage(tmp_path / f"{name}.pt", tiny_prepared, tmp_path / f"{name}.onnx", ExportParams())
    return tmp_path / f"{name}.onnx"


def _test_split(tiny_prepared):
    test = load_split(tiny_prepared, "test")
    return test["images"], test["masks"][:, 0].astype(bool), test["lungs"][:, 0].astype(bool)


def test_only_the_inner_convolutions_are_quantised_and_the_metadata_is_kept(tmp_path, tiny_prepared):
    fp32 = _fp32_onnx(tmp_path, tiny_prepared)  # flip averaging on: the graph holds the network twice
    int8 = quantize(fp32, tmp_path / "m-int8.onnx", load_split(tiny_prepared, "val")["images"])
    graph = onnx.load(str(int8)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    made_by = {o: n for n in graph.node for o in n.output}
    weights = {w.name: w for w in graph.initializer}

    def quantised(node, slot: int = 0) -> bool:  # that input comes through a DequantizeLinear
        src = made_by.get(node.input[slot])
        return src is not None and src.op_type == "DequantizeLinear"

    def kernel(conv) -> list[int]:  # (out, in, kh, kw), the weight read directly or through its DequantizeLinear
        name = conv.input[1]
        return list(weights[made_by[name].input[0] if name in made_by else name].dims)

    # fp32: the two convolutions reading the grey input (1 channel in) and the two 1x1 heads writing the logits
    boundary = [c for c in convs if kernel(c)[1] == 1 or kernel(c)[2:] == [1, 1]]
    assert len(convs) > 4 and len(boundary) == 4
    assert not any(quantised(c, slot=1) for c in boundary)  # fp32 weights
    assert all(quantised(c) and quantised(c, slot=1) for c in convs if c not in boundary)
    assert all(quantised(n) for n in graph.node if n.op_type in ("MaxPool", "ConvTranspose"))  # 8-bit between convs
    assert "BatchNormalization" not in {n.op_type for n in graph.node}  # folded into the convolutions
    # Both copies of the network share each int8 weight: at most a quarter of the fp32 file's weight bytes.
    int8_bytes = sum(
        onnx.numpy_helper.to_array(w).nbytes for w in graph.initializer if w.data_type == onnx.TensorProto.INT8
    )
    fp32_bytes = sum(onnx.numpy_helper.to_array(w).nbytes for w in onnx.load(str(fp32)).graph.initializer)
    assert 0 < int8_bytes <= fp32_bytes / 4
    quantised_ops = {made_by[i].op_type for n in graph.node if n.op_type != "Conv" for i in n.input if i in made_by}
    assert "QLinearConv" not in quantised_ops  # QDQ format, not operator-oriented
    a, b = OnnxPredictor(fp32), OnnxPredictor(int8)
    assert b.metadata[QUANTIZATION_KEY].startswith("int8 QDQ")
    ours = {k: v for k, v in b.metadata.items() if k.startswith("covidseg.") and k != QUANTIZATION_KEY}
    assert ours == a.metadata
    images = load_split(tiny_prepared, "test")["images"]
    pa, pb = a.predict(images, normalised=True), b.predict(images, normalised=True)
    assert pb.shape == pa.shape and float(np.abs(pa - pb).max()) < 0.1


def test_reduce_range_stores_seven_bit_weights_and_says_so(tmp_path, tiny_prepared):
    fp32 = _fp32_onnx(tmp_path, tiny_prepared)
    val = load_split(tiny_prepared, "val")["images"]
    full = onnx.load(str(quantize(fp32, tmp_path / "full.onnx", val)))
    seven = onnx.load(str(quantize(fp32, tmp_path / "seven.onnx", val, reduce_range=True)))

    def int8_weights(model) -> np.ndarray:
        arrays = [onnx.numpy_helper.to_array(w) for w in model.graph.initializer]
        return np.concatenate([a.ravel().astype(int) for a in arrays if a.dtype == np.int8])

    assert np.abs(int8_weights(full)).max() == 127  # symmetric per channel: the largest weight is +-127
    assert np.abs(int8_weights(seven)).max() == 64  # half of it: 7 bits
    meta = {p.key: p.value for p in seven.metadata_props}
    assert "reduce_range" in meta[QUANTIZATION_KEY]
    assert "reduce_range" not in {p.key: p.value for p in full.metadata_props}[QUANTIZATION_KEY]


def test_a_model_compared_with_itself_ties_with_a_zero_difference(tmp_path, tiny_prepared):
    fp32 = _fp32_onnx(tmp_path, tiny_prepared)
    out = compare(fp32, fp32, *_test_split(tiny_prepared), n_resamples=200)
    assert "dice" in out
    for name in {"dice", "share_error"} & set(out):
        assert out[name]["difference"] == 0 and out[name]["tie"] and out[name]["margin"] >= 0
        assert out[name]["fp32"] == out[name]["int8"]


class _Fake:
    """Stands in for OnnxPredictor: fixed probabilities (N, S, S) and lung logits, threshold 0.5."""

    threshold = 0.5

    def __init__(self, prob, lung):
        self.prob, self.lung = prob.astype(np.float32), lung

    def run(self, images, normalised=False):
        logits = np.stack([np.zeros_like(self.prob), np.where(self.lung, 9.0, -9.0)], 1).astype(np.float32)
        return self.prob, logits


def _two_lungs(n=4, s=32):
    lungs = np.zeros((n, s, s), bool)
    lungs[:, 4:28, 2:14] = True  # image left: the patient's right lung, 24 x 12 = 288 px
    lungs[:, 4:28, 18:30] = True  # the left lung
    return lungs


def test_the_share_error_is_the_mean_absolute_per_lung_share_error_by_hand():
    lungs = _two_lungs()
    truth = np.zeros_like(lungs)
    truth[:, 4:16, 2:14] = True  # right lung half infected (144 / 288 px = 50 %), left clean
    pred = np.zeros(lungs.shape, np.float32)
    pred[:, 4:10, 2:14] = 0.9  # right lung 72 / 288 = 25 % marked
    pred[:, 4:10, 18:30] = 0.9  # left lung 25 % marked
    scores = int8_mod._scores(_Fake(pred, lungs), None, truth, np.array([[50.0, 0.0]] * 4))
    # per image: (|25 - 50| + |25 - 0|) / 2 = 25 points; Dice 2 * 72 / (144 + 144) = 0.5
    assert scores["share_error"] == pytest.approx([25.0] * 4)
    assert scores["dice"] == pytest.approx([0.5] * 4)


def test_a_film_without_a_true_lung_share_has_no_share_error_and_no_warning():
    lungs = _two_lungs(n=2)
    truth = np.zeros_like(lungs)
    pred = np.zeros(lungs.shape, np.float32)
    pred[:, 4:10, 2:14] = 0.9  # right lung 25 % marked, left 0 %
    true_shares = np.array([[np.nan, np.nan], [np.nan, 10.0]])  # film 0: no true lung; film 1: the left only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would fail here
        scores = int8_mod._scores(_Fake(pred, lungs), None, truth, true_shares)
    assert np.isnan(scores["share_error"][0]) and scores["share_error"][1] == pytest.approx(10.0)


def test_a_model_that_answers_differently_is_refused_naming_the_metric(tmp_path, monkeypatch):
    lungs = _two_lungs(n=6)
    truth = np.zeros_like(lungs)
    truth[:, 4:16, 2:14] = True
    good = np.where(truth, 0.9, 0.1)
    worse = good.copy()
    worse[:, 4:10, 2:14] = 0.1  # misses half the infection on every film
    fakes = {"fp32.onnx": _Fake(good, lungs), "int8.onnx": _Fake(worse, lungs)}
    monkeypatch.setattr(int8_mod, "OnnxPredictor", lambda path: fakes[Path(path).name])
    with pytest.raises(
        Int8Mismatch, match=r"final-int8\.onnx: int8 does not tie with fp32 on dice: difference -0\.3333"
    ):
        compare("fp32.onnx", "int8.onnx", np.zeros((6, 1, 32, 32), np.uint8), truth, lungs, name="final-int8.onnx")
    fakes["int8.onnx"] = _Fake(good, lungs)
    out = compare("fp32.onnx", "int8.onnx", np.zeros((6, 1, 32, 32), np.uint8), truth, lungs)
    assert out["dice"]["tie"] and out["share_error"]["tie"] and out["share_error"]["fp32"] == pytest.approx(0.0)


def test_the_stage_keeps_the_int8_file_only_when_it_ties(tmp_path, tiny_prepared, monkeypatch):
    torch.manual_seed(0)
    save_model(tmp_path / "m.pt", UNet(UNetConfig(out_channels=2, base_channels=4, depth=3)).eval(), META)
    params = ExportParams(int8_calibration_images=3)
    s = export_stage(
        tmp_path / "m.pt", tiny_prepared, tmp_path / "m.onnx", params, tmp_path / "e.json", tmp_path / "m-int8.onnx"
    )
    assert (tmp_path / "m-int8.onnx").is_file() and s["int8"]["calibration_images"] == 3
    assert s["int8"]["dice"]["tie"] and json.loads((tmp_path / "e.json").read_text())["int8"] == s["int8"]

    def never_ties(*args, **kwargs):
        raise Int8Mismatch("int8 does not tie")

    monkeypatch.setattr(stage_mod, "compare", never_ties)
    with pytest.raises(Int8Mismatch):
        export_stage(tmp_path / "m.pt", tiny_prepared, tmp_path / "n.onnx", params, None, tmp_path / "n-int8.onnx")
    assert (tmp_path / "n.onnx").is_file() and not (tmp_path / "n-int8.onnx").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".n-int8")]  # no temporary left
