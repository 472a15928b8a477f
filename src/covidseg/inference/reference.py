"""Where the reference model (the real-data preset's weights, shipped with covidseg) lives.

``models/reference/`` in a checkout holds ``model.onnx`` (fp32, calibration inside), ``model.pt``,
``model-int8.onnx`` where int8 ties with fp32, ``MODEL_CARD.md`` and ``reference.json`` (how it
was made). A pip install (wheel or sdist) puts the same files under
``<prefix>/share/covidseg/reference/`` (``[tool.setuptools.data-files]`` in pyproject.toml), so a
core install without a checkout finds them too. ``COVIDSEG_REFERENCE_DIR`` points elsewhere.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

ENV_VAR = "COVIDSEG_REFERENCE_DIR"
FP32_ONNX = "model.onnx"
TORCH_FILE = "model.pt"
INT8_ONNX = "model-int8.onnx"
CARD = "MODEL_CARD.md"
RECORD = "reference.json"
NAME = "the reference model"


def candidate_dirs() -> list[Path]:
    """The folders searched, in order: this checkout's ``models/reference``, the install prefix's
    ``share/covidseg/reference`` (the venv's, then the interpreter's base); only ``$COVIDSEG_REFERENCE_DIR``
    when that is set (a folder the user names is never silently passed over)."""
    if os.environ.get(ENV_VAR):
        return [Path(os.environ[ENV_VAR])]
    out = [Path(__file__).resolve().parents[3] / "models" / "reference"]  # src/covidseg/inference -> repo
    for prefix in dict.fromkeys([sysconfig.get_path("data"), sys.prefix, sys.base_prefix]):
        out.append(Path(prefix) / "share" / "covidseg" / "reference")
    return out


def reference_dir() -> Path:
    """The first of :func:`candidate_dirs` that holds the fp32 ONNX model; FileNotFoundError naming them all."""
    dirs = candidate_dirs()
    for d in dirs:
        if (d / FP32_ONNX).is_file():
            return d
    looked = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"{NAME} was not found (looked in {looked}); give a model with --model, or set {ENV_VAR} to a folder "
        f"holding {FP32_ONNX}"
    )


def reference_model(kind: str = FP32_ONNX) -> Path:
    """The path of one reference file (``model.onnx`` by default); FileNotFoundError when it is not shipped."""
    path = reference_dir() / kind
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {NAME} has no {kind}")
    return path
