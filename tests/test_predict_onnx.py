"""`covidseg predict --model model.onnx`: same outputs and CSV as from model.pt, torch-free, bad files refused."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covidseg.export.graph import export_onnx
from covidseg.inference.calibration import Calibration
from covidseg.inference.predict import CSV_COLUMNS, read_csv
from covidseg.masks.severity import LUNG_THRESHOLD
from covidseg.model.checkpoint import save_model
from covidseg.model.unet import UNet, UNetConfig

from conftest import REPO
from helpers import FAST_PREDICT_FLAGS, invoke_predict, save_image

SIZE = 32
CALIBRATION = Calibration(threshold=0.45, temperature=1.3, lung_gate=True, flip_tta=True)
TEXT_COLUMNS = {
    "input",
    "stem",
    "sop_instance_uid",
    "view",
    "severity_status",
    "pixel_spacing_source",
    "review",
    "status",
    "error",
    "warning",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(model.pt, model.onnx): one tiny U-Net with a lung head, calibrated, saved both ways."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(3)
    net = UNet(UNetConfig(base_channels=4, depth=2, out_channels=2)).eval()
    with torch.no_grad():  # a random net's outputs are nearly flat: scale them so the masks have structure
        net.head.weight.mul_(100.0)
        net.head.bias.copy_(torch.tensor([0.0, 1.0]))
    save_model(root / "model.pt", net, asdict(CALIBRATION) | {"size": SIZE})
    export_onnx(net, root / "model.onnx", SIZE, {}, calibration=CALIBRATION)
    return root / "model.pt", root / "model.onnx"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("in")
    return [
        save_image(root / "grey.png", "grey", 100, 80),
        save_image(root / "rgb.png", "rgb", 45, 61, seed=1),
        save_image(root / "same.png", "grey", SIZE, SIZE, seed=2),
    ]


def test_backend_is_picked_by_bytes_then_suffix(models, tmp_path):
    from covidseg.inference import backends

    pt, onnx_file = models
    assert backends.model_backend(pt) == "torch" and backends.model_backend(onnx_file) == "onnx"
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(onnx_file.read_bytes())
    assert backends.model_backend(renamed) == "onnx"  # by its bytes
    zipped_onnx = tmp_path / "weights.onnx"
    zipped_onnx.write_bytes(pt.read_bytes())
    assert backends.model_backend(zipped_onnx) == "torch"  # a torch zip whatever its suffix


def test_predict_uses_the_one_lung_threshold_of_the_severity_code():
    from covidseg.inference import predict

    assert predict.LUNG_THRESHOLD is LUNG_THRESHOLD == 0.5


def test_onnx_gives_the_same_files_and_csv_as_the_torch_model(models, inputs, tmp_path):
    pt, onnx_file = models
    outs = {}
    for name, model in (("pt", pt), ("onnx", onnx_file)):
        outs[name] = tmp_path / name
        result = invoke_predict(*inputs, "--model", model, "--out", outs[name], "--save-probs", *FAST_PREDICT_FLAGS)
        assert result.exit_code == 0, result.output
        assert "WARNING" not in result.stderr  # the lung head is found in the ONNX graph too
    files = {k: sorted(p.relative_to(v).as_posix() for p in v.rglob("*") if p.is_file()) for k, v in outs.items()}
    assert files["pt"] == files["onnx"]
    assert {f.split("/")[0] for f in files["pt"]} == {"masks", "lungs", "overlays", "probs", "predictions.csv"}

    rows_pt, rows_onnx = read_csv(outs["pt"] / "predictions.csv"), read_csv(outs["onnx"] / "predictions.csv")
    assert len(rows_pt) == len(rows_onnx) == len(inputs)
    for a, b in zip(rows_pt, rows_onnx):
        assert a["status"] == b["status"] == "ok"
        for column in CSV_COLUMNS:
            if column in TEXT_COLUMNS or a[column] == "":
                assert a[column] == b[column], column
            else:
                assert abs(float(a[column]) - float(b[column])) <= 1e-4, (a["stem"], column, a[column], b[column])
        # severity judged from the ONNX lung logits too (the random model's lungs may give a refusal, not a number)
        assert a["severity_status"] != "" and a["infected_outside_lungs_pct"] != ""

    for stem in (p.stem for p in inputs):
        prob_pt = np.load(outs["pt"] / "probs" / f"{stem}.npy")
        prob_onnx = np.load(outs["onnx"] / "probs" / f"{stem}.npy")
        np.testing.assert_allclose(prob_onnx, prob_pt, atol=1e-4)
        assert 0.01 < (prob_pt >= CALIBRATION.threshold).mean() < 0.99  # the masks are not trivial
        for folder, threshold, near in (("masks", CALIBRATION.threshold, prob_pt), ("lungs", LUNG_THRESHOLD, None)):
            m_pt = np.asarray(Image.open(outs["pt"] / folder / f"{stem}.png"))
            m_onnx = np.asarray(Image.open(outs["onnx"] / folder / f"{stem}.png"))
            differ = m_pt != m_onnx
            if near is not None:  # pixels may only differ where the probability sits at the threshold
                assert np.all(np.abs(near[differ] - threshold) < 1e-4)
            else:
                assert differ.mean() < 1e-3
        overlay_pt = np.asarray(Image.open(outs["pt"] / "overlays" / f"{stem}.png"), dtype=int)
        overlay_onnx = np.asarray(Image.open(outs["onnx"] / "overlays" / f"{stem}.png"), dtype=int)
        assert (np.abs(overlay_pt - overlay_onnx).max(axis=-1) > 0).mean() < 1e-2


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from covidseg.cli import app
try:
    app(sys.argv[1:])
finally:
    assert not [m for m in sys.modules if m.startswith("torch") and sys.modules[m] is not None]
"""


def _run_without_torch(*args: str) -> subprocess.CompletedProcess:
    # the caller's PYTHONPATH first (it may point at the source under test), then this checkout's
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO / "src")]))}
    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_predict_from_onnx_runs_with_torch_unimportable(models, inputs, tmp_path):
    pt, onnx_file = models
    out = tmp_path / "out"
    done = _run_without_torch("predict", *inputs, "--model", onnx_file, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "predictions.csv")
    assert [r["status"] for r in rows] == ["ok"] * len(inputs)
    assert all(
        (out / "masks" / f"{p.stem}.png").is_file() and (out / "lungs" / f"{p.stem}.png").is_file() for p in inputs
    )
    # the same prelude really blocks torch: the torch model cannot load there
    blocked = _run_without_torch("predict", inputs[0], "--model", pt, "--out", tmp_path / "pt", "--quiet")
    assert blocked.returncode != 0 and "torch" in blocked.stderr


def test_a_corrupt_onnx_file_is_a_short_error_and_exit_2(inputs, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf model" * 5)
    result = invoke_predict(inputs[0], "--model", bad, "--out", tmp_path / "out", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bad}: not a loadable ONNX model")
    assert len(result.stderr.strip().splitlines()) == 1 and len(result.stderr) < 400
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_onnx_flip_tta_cannot_be_switched_off_and_the_threshold_option_applies(models, inputs, tmp_path):
    _, onnx_file = models
    result = invoke_predict(
        inputs[0], "--model", onnx_file, "--out", tmp_path / "a", "--no-flip-tta", *FAST_PREDICT_FLAGS
    )
    assert result.exit_code == 2 and "flip TTA is on inside this ONNX graph" in result.stderr
    result = invoke_predict(inputs[0], "--model", onnx_file, "--out", tmp_path / "b", "--threshold", "0.9")
    assert result.exit_code == 0, result.output
    assert "threshold 0.9 (option)" in result.stdout
