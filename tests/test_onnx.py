"""ONNX export with calibration baked in: parity with torch, dynamic batch, metadata, determinism, torch-free runner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from covidseg.export import graph as onnxexport
from covidseg.export.graph import ParityError, check_parity, export_onnx, parity
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.inference.onnx_runtime import OnnxModelError, OnnxPredictor
from covidseg.model.unet import UNet, UNetConfig

from conftest import REPO

SIZE = 32
CASES = {
    # name: (out_channels, downsample, calibration)
    "plain_T1.5": (1, 1, Calibration(threshold=0.35, temperature=1.5)),
    "lung_gate_flip_T0.7": (2, 2, Calibration(threshold=0.6, temperature=0.7, lung_gate=True, flip_tta=True)),
    "lung_head_no_gate_flip": (2, 1, Calibration(temperature=2.0, flip_tta=True)),
}


def tiny_unet(out_channels: int, downsample: int, seed: int = 0) -> UNet:
    """base 4, depth 2, with random BatchNorm statistics so eval-mode normalisation is exercised."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(out_channels=out_channels, base_channels=4, depth=2, downsample=downsample))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, SIZE, SIZE), dtype=np.uint8)


def torch_probs(model: UNet, calibration: Calibration):
    return lambda x: calibrated_probabilities(model, x, torch.device("cpu"), "fp32", calibration)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[UNet, Calibration, object]]:
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, (channels, k, cal) in CASES.items():
        model = tiny_unet(channels, k)
        path = export_onnx(model, root / f"{name}.onnx", SIZE, {"covidseg.source": "tests"}, calibration=cal)
        out[name] = (model, cal, path)
    return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("n", [1, 3])
def test_parity_with_calibrated_torch_probabilities_at_batch_1_and_3(exported, name, n):
    model, cal, path = exported[name]
    x = images(n, seed=n)
    diff = parity(torch_probs(model, cal), path, x)
    assert diff < 1e-4
    probs = OnnxPredictor(path).predict(x)
    assert probs.dtype == np.float32 and probs.shape == (n, SIZE, SIZE)
    assert 0.0 <= probs.min() and probs.max() <= 1.0 and probs.std() > 0  # not a constant map


def test_calibration_is_in_the_graph_not_only_in_metadata(exported):
    # The temperature changes the probabilities the graph returns; raw sigmoid(logit) would not match.
    model, cal, path = exported["plain_T1.5"]
    x = images(2)
    probs, logits = OnnxPredictor(path).run(x)
    assert logits.shape == (2, 1, SIZE, SIZE)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits[:, 0] / 1.5)), atol=1e-5)
    assert parity(torch_probs(model, Calibration()), path, x) > 1e-3
    # Lung gating: the infection probability never exceeds the lung probability.
    _, _, gated = exported["lung_gate_flip_T0.7"]
    probs, logits = OnnxPredictor(gated).run(x)
    assert logits.shape == (2, 2, SIZE, SIZE)
    assert (probs <= 1 / (1 + np.exp(-logits[:, 1] / 0.7)) + 1e-6).all()


def test_metadata_round_trip_and_graph_signature(exported):
    model, cal, path = exported["lung_gate_flip_T0.7"]
    runner = OnnxPredictor(path)
    assert runner.size == SIZE and runner.threshold == 0.6
    assert runner.calibration == {"temperature": 0.7, "lung_gate": True, "flip_tta": True, "threshold": 0.6}
    assert runner.metadata["covidseg.source"] == "tests"
    assert runner.metadata["covidseg.format_version"] == "1"
    assert UNetConfig(**json.loads(runner.metadata["covidseg.config"])) == model.config
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["probability", "logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, SIZE, SIZE]  # dynamic batch only
    assert {o.domain: o.version for o in proto.opset_import}[""] >= 17
    assert OnnxPredictor(exported["lung_head_no_gate_flip"][2]).threshold is None


def test_masks_use_the_tuned_threshold(exported):
    _, cal, path = exported["plain_T1.5"]
    runner = OnnxPredictor(path)
    x = images(2)
    np.testing.assert_array_equal(runner.masks(x), runner.predict(x) >= 0.35)
    with pytest.raises(ValueError, match="no tuned threshold"):
        OnnxPredictor(exported["lung_head_no_gate_flip"][2]).masks(x)


def test_export_is_byte_deterministic_and_opset_17_works(tmp_path):
    model = tiny_unet(1, 1).train()  # exported in eval mode all the same; the caller's model is left in train mode
    digests = [
        hashlib.sha256(export_onnx(model, tmp_path / f"m{i}.onnx", SIZE, {}).read_bytes()).hexdigest() for i in range(2)
    ]
    assert digests[0] == digests[1]
    assert model.training
    path = export_onnx(model, tmp_path / "o17.onnx", SIZE, {}, opset=17)
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 17


def test_parity_failure_raises_naming_the_file_and_export_leaves_nothing(exported, tmp_path, monkeypatch):
    model, cal, path = exported["plain_T1.5"]
    other = tiny_unet(1, 1, seed=5)
    with pytest.raises(ParityError, match=rf"{path.name}: ONNX probabilities differ from torch by .* > 0.0001"):
        check_parity(torch_probs(other, cal), path, images(2))
    monkeypatch.setattr(
        onnxexport, "_torch_probabilities", lambda net, c, x: np.zeros((len(x), SIZE, SIZE), np.float32)
    )
    target = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match=r"bad\.onnx"):
        export_onnx(model, target, SIZE, {})
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file


def test_bad_inputs_are_refused_by_name(exported, tmp_path):
    model, cal, path = exported["plain_T1.5"]
    with pytest.raises(ValueError, match=r"expects uint8 images \(N, 1, 32, 32\), got float32"):
        OnnxPredictor(path).predict(images(1).astype(np.float32))
    with pytest.raises(ValueError, match="written by the exporter itself"):
        export_onnx(model, tmp_path / "x.onnx", SIZE, {"covidseg.threshold": "0.9"})
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match=r"junk\.onnx: not a loadable ONNX model"):
        OnnxPredictor(junk)
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    with pytest.raises(OnnxModelError, match=r"bare\.onnx: not a covidseg ONNX model \(metadata lacks"):
        OnnxPredictor(tmp_path / "bare.onnx")


def test_runner_works_without_torch(exported, tmp_path):
    model, cal, path = exported["lung_gate_flip_T0.7"]
    x = images(3)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from covidseg.inference.onnx_runtime import OnnxPredictor
        probs = OnnxPredictor({str(path)!r}).predict(np.load({str(tmp_path / "x.npy")!r}))
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
        np.save({str(tmp_path / "p.npy")!r}, probs)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), torch_probs(model, cal)(x), atol=1e-4)


def test_export_holds_no_source_paths(tmp_path):
    """The exporter's stack traces name this checkout's files: stripped, so every clone exports the same bytes."""
    import onnx
    import torch

    from covidseg.export.graph import export_onnx
    from covidseg.model.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=4, depth=2)).eval()
    path = export_onnx(net, tmp_path / "m.onnx", size=32, metadata={})
    data = path.read_bytes()
    src = str(Path(__file__).resolve().parents[1] / "src")
    assert src.encode() not in data and b"stack_trace" not in data
    assert all(len(node.metadata_props) == 0 for node in onnx.load(str(path)).graph.node)


def test_export_says_nothing_about_torchvision_or_torch_internals(tmp_path):
    """A fresh interpreter (torch logs its torchvision notes once per process): the export stays quiet."""
    code = (
        "import torch; from covidseg.export.graph import export_onnx; from covidseg.model.unet import UNet, UNetConfig; "
        "torch.manual_seed(0); export_onnx(UNet(UNetConfig(base_channels=4, depth=2)), "
        f"{str(tmp_path / 'q.onnx')!r}, 32, {{}})"
    )
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr
