"""`pip install covidseg` (the core, no torch) predicts with an ONNX model, in a fresh virtual environment.

Slow (it installs the core's packages from the registry into a new venv): `make test-all` runs it.
"""

from __future__ import annotations

import shutil
import subprocess
import venv

import numpy as np
import pytest
import torch
from PIL import Image

from covidseg.export.graph import export_onnx
from covidseg.model.unet import UNet, UNetConfig

from conftest import REPO

pytestmark = pytest.mark.slow


def test_the_core_install_predicts_with_an_onnx_model_and_has_no_torch(tmp_path):
    project = tmp_path / "project"  # a copy, so that the build writes nothing into the checkout
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "models" / "reference", project / "models" / "reference")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(project)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0  # the core does not pull torch in

    torch.manual_seed(0)
    model = export_onnx(UNet(UNetConfig(base_channels=4, depth=2, out_channels=2)), tmp_path / "m.onnx", 32, {})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(tmp_path / "film.png")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(env_dir / "bin" / "covidseg"),
            "predict",
            str(tmp_path / "film.png"),
            "--model",
            str(model),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "predictions.csv").is_file() and Image.open(out / "masks" / "film.png").size == (80, 64)
    version = subprocess.run([str(env_dir / "bin" / "covidseg"), "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("covidseg ")

    # without --model: the reference model, installed as data files under the venv's share/covidseg/reference
    default = subprocess.run(
        [str(env_dir / "bin" / "covidseg"), "predict", str(tmp_path / "film.png"), "--out", str(tmp_path / "ref")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout: the install alone must find it
    )
    assert default.returncode == 0, default.stderr
    assert "using the reference model" in default.stderr
    assert str(env_dir / "share" / "covidseg" / "reference" / "model.onnx") in default.stderr.replace("\n", "")
    assert (tmp_path / "ref" / "masks" / "film.png").is_file()
