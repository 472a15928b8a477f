"""preprocess.contrast travels with the model: train records it, predict (torch and ONNX) and the ONNX runner apply it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covidseg.data.arrays import load_split, resize_image
from covidseg.data.contrast import normalise_contrast
from covidseg.export.stage import export_stage
from covidseg.inference import backends
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.inference.onnx_runtime import OnnxModelError, OnnxPredictor
from covidseg.inference.predict import resize_probs
from covidseg.model.checkpoint import load_model, save_model
from covidseg.params import ExportParams, TrainParams
from covidseg.training.run import train

from helpers import FAST_PREDICT_FLAGS, grey_array, invoke_predict

SIZE = 64
CPU = torch.device("cpu")
TINY = TrainParams(epochs=1, batch_size=4, base_channels=4, depth=3, downsample=1, lr=1e-3, temperature_scaling=False)


@pytest.fixture(scope="module")
def clahe_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny run on CLAHE-prepared arrays: {"prepared", "trained" (train's model.pt), "model" (the
    same with a sharpened head), "onnx" (its export)}."""
    from covidseg.data.extract import extract
    from covidseg.data.preprocess import preprocess
    from covidseg.data.synth import synthesize
    from covidseg.params import DataParams, PreprocessParams, SynthParams

    root = tmp_path_factory.mktemp("clahe")
    synthesize(root / "raw", SynthParams(train=4, val=2, test=2, negatives=0, image_size=SIZE), seed=5)
    extract(root / "raw", root / "extracted", root / "data.json", DataParams(source=str(root / "raw")))
    preprocess(root / "extracted", root / "prepared", PreprocessParams(image_size=SIZE, contrast="clahe"))
    trained = root / "trained.pt"
    train(
        root / "prepared",
        trained,
        root / "resume",
        root / "curves.tsv",
        root / "train.json",
        TINY,
        0,
    )
    # One epoch leaves the outputs nearly flat: sharpen the head so the probabilities follow the input.
    net, meta = load_model(trained)
    with torch.no_grad():
        net.head.weight.mul_(100.0)
    model = root / "model.pt"
    save_model(model, net, meta)
    export_stage(model, root / "prepared", root / "model.onnx", ExportParams(parity_images=2))
    return {"prepared": root / "prepared", "trained": trained, "model": model, "onnx": root / "model.onnx"}


def _expected(model_path: Path, grey: np.ndarray, contrast: str) -> np.ndarray:
    """float32 (H, W): the pipeline's own path: resize, contrast, calibrated model, resize back."""
    net, meta = load_model(model_path)
    small = np.array(normalise_contrast(resize_image(grey, SIZE), contrast))
    prob = calibrated_probabilities(net, small[None, None], CPU, "fp32", Calibration.from_meta(meta))[0]
    return resize_probs(prob, grey.shape[1], grey.shape[0])


def test_training_on_clahe_arrays_records_clahe_in_the_model_file(clahe_run):
    _, meta = load_model(clahe_run["trained"])
    assert meta["contrast"] == "clahe"
    prepared = backends.load_any_model(clahe_run["trained"], device="cpu", precision="fp32")
    assert prepared.contrast == "clahe" and prepared.description.endswith("contrast clahe")


@pytest.mark.parametrize("kind", ["pt", "onnx"])
def test_predict_applies_the_model_files_contrast(clahe_run, tmp_path, kind):
    model = clahe_run["model" if kind == "pt" else "onnx"]
    d = tmp_path / "in"
    d.mkdir()
    greys = {"same": grey_array(SIZE, SIZE, seed=1), "big": grey_array(90, 70, seed=2)}
    for stem, g in greys.items():
        Image.fromarray(g).save(d / f"{stem}.png")
    out = tmp_path / "out"
    result = invoke_predict(d, "--model", model, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    for stem, g in greys.items():
        got = np.load(out / "probs" / f"{stem}.npy")
        np.testing.assert_allclose(got, _expected(clahe_run["model"], g, "clahe"), atol=1e-4, err_msg=stem)
        assert np.abs(got - _expected(clahe_run["model"], g, "none")).max() > 1e-3  # the contrast step matters


def test_the_onnx_file_records_the_contrast_and_its_runner_applies_it(clahe_run):
    runner = OnnxPredictor(clahe_run["onnx"])
    assert runner.metadata["covidseg.contrast"] == runner.contrast == "clahe"
    raw = np.stack([grey_array(SIZE, SIZE, seed=s) for s in (3, 4)])[:, None]
    normed = normalise_contrast(raw[:, 0], "clahe")[:, None]
    np.testing.assert_array_equal(runner.predict(raw), runner.predict(normed, normalised=True))
    assert np.abs(runner.predict(raw) - runner.predict(raw, normalised=True)).max() > 1e-3
    net, meta = load_model(clahe_run["model"])
    want = calibrated_probabilities(net, normed, CPU, "fp32", Calibration.from_meta(meta))
    np.testing.assert_allclose(runner.predict(raw), want, atol=1e-4)
    # the export's parity check compared the graph on the prepared (already normalised) test images
    test = load_split(clahe_run["prepared"], "test")["images"]
    np.testing.assert_allclose(
        runner.predict(test, normalised=True),
        calibrated_probabilities(net, test, CPU, "fp32", Calibration.from_meta(meta)),
        atol=1e-4,
    )


def test_a_model_file_without_contrast_means_none_and_a_bad_one_is_refused(clahe_run, tmp_path):
    net, meta = load_model(clahe_run["model"])
    old = {k: v for k, v in meta.items() if k != "contrast"}
    save_model(tmp_path / "old.pt", net, old)
    assert backends.load_any_model(tmp_path / "old.pt", device="cpu", precision="fp32").contrast == "none"
    save_model(tmp_path / "bad.pt", net, old | {"contrast": "sharpen"})
    with pytest.raises(ValueError, match=r"bad\.pt: metadata contrast = 'sharpen' is not one of none, "):
        backends.load_any_model(tmp_path / "bad.pt", device="cpu", precision="fp32")


def test_an_onnx_file_without_contrast_means_none_and_a_bad_one_is_refused(clahe_run, tmp_path):
    import onnx

    proto = onnx.load(clahe_run["onnx"])
    for value, name in ((None, "old.onnx"), ("sharpen", "bad.onnx")):
        edited = onnx.ModelProto()
        edited.CopyFrom(proto)
        kept = [(p.key, p.value) for p in edited.metadata_props if p.key != "covidseg.contrast"]
        del edited.metadata_props[:]
        for key, v in kept + ([("covidseg.contrast", value)] if value else []):
            entry = edited.metadata_props.add()
            entry.key, entry.value = key, v
        onnx.save_model(edited, tmp_path / name)
    assert OnnxPredictor(tmp_path / "old.onnx").contrast == "none"
    with pytest.raises(OnnxModelError, match=r"bad\.onnx: metadata covidseg.contrast = 'sharpen' is not one of none, "):
        OnnxPredictor(tmp_path / "bad.onnx")


def test_export_refuses_an_unknown_contrast(tmp_path):
    from covidseg.export.graph import export_onnx
    from covidseg.model.unet import UNet, UNetConfig

    net = UNet(UNetConfig(base_channels=4, depth=2)).eval()
    with pytest.raises(ValueError, match="unknown contrast method 'sharpen'"):
        export_onnx(net, tmp_path / "m.onnx", 32, {}, contrast="sharpen")
    assert not (tmp_path / "m.onnx").exists()
