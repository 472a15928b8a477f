"""The ``export`` stage: models/model.pt -> models/model.onnx, checked against torch on the test images.

The graph and its metadata are :func:`covidseg.export.graph.export_onnx`'s; this adds the
model file's provenance and contrast method to the metadata and a parity check on the real test split (uint8
(N, 1, S, S) from ``data/prepared/test.npz``) that must pass before the file appears.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from covidseg.atomic import atomic_path, write_json
from covidseg.data.arrays import load_split
from covidseg.export.graph import ParityError, export_onnx, parity
from covidseg.export.int8 import compare, quantize
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.model.checkpoint import load_model
from covidseg.params import ExportParams


def export_stage(
    model_pt: str | Path,
    prepared_dir: str | Path,
    onnx_path: str | Path,
    params: ExportParams,
    summary_path: str | Path | None = None,
    int8_path: str | Path | None = None,
) -> dict:
    """Export ``model_pt`` to ``onnx_path`` atomically; fail when ONNX and torch disagree on the test images.

    Returns (and writes to ``summary_path`` as JSON when given) ``{"opset", "parity_images",
    "parity_max_abs_diff", "parity_tolerance", "onnx_bytes"}``; ``parity_max_abs_diff`` is
    max |p_torch - p_onnx| over every pixel of the checked images, fp32 calibrated probabilities.
    With ``int8_path``, also the int8 model there (:mod:`covidseg.export.int8`), calibrated on val and
    kept only when it ties with the fp32 ONNX on every test image; ``int8`` then holds that comparison.

    Raises:
        ParityError: the difference exceeds ``params.parity_tolerance`` (names the file and the number).
        ValueError: the test images do not have the model's input size (names both files).
        Int8Mismatch: the int8 model does not tie with fp32 (the fp32 ONNX is written, the int8 file not).
    """
    model_pt, onnx_path = Path(model_pt), Path(onnx_path)
    net, meta = load_model(model_pt)
    calibration = Calibration.from_meta(meta)
    test = load_split(prepared_dir, "test")
    images = test["images"]
    if params.parity_images:
        images = images[: params.parity_images]
    size = int(meta.get("size", images.shape[-1]))
    if images.shape[1:] != (1, size, size):
        raise ValueError(
            f"{Path(prepared_dir) / 'test.npz'}: images {images.shape[1:]} do not fit {model_pt} "
            f"(input 1x{size}x{size}); rerun preprocess and train together"
        )
    metadata = {
        "covidseg.source_model_sha256": hashlib.sha256(model_pt.read_bytes()).hexdigest(),
        "covidseg.provenance": json.dumps(meta.get("provenance", {}), sort_keys=True),
        "covidseg.train_precision": str(meta.get("train_precision", "unknown")),
    }
    if meta.get("share_interval"):  # the per-lung share interval fitted on val (covidseg.masks.share_interval)
        metadata["covidseg.share_interval"] = json.dumps(meta["share_interval"], sort_keys=True)
    with atomic_path(onnx_path) as tmp:
        # export_onnx's own check uses two random images; the one that gates the stage is below.
        contrast = str(meta.get("contrast", "none"))  # the test images are already normalised by it
        export_onnx(net, tmp, size, metadata, params.opset, calibration, check=False, contrast=contrast)
        want = lambda x: calibrated_probabilities(net, x, torch.device("cpu"), "fp32", calibration)  # noqa: E731
        diff = parity(want, tmp, images)
        if not diff <= params.parity_tolerance:
            raise ParityError(
                f"{onnx_path}: ONNX probabilities differ from torch's by {diff:.3g} (max abs, fp32) "
                f"> {params.parity_tolerance:g} on {len(images)} test images; the file was not written"
            )
        n_bytes = tmp.stat().st_size
    summary = {
        "opset": params.opset,
        "parity_images": int(len(images)),
        "parity_max_abs_diff": float(np.float32(diff)),
        "parity_tolerance": params.parity_tolerance,
        "onnx_bytes": int(n_bytes),
    }
    if int8_path is not None:
        summary["int8"] = _int8(onnx_path, Path(int8_path), prepared_dir, test, params)
    if summary_path is not None:
        write_json(summary_path, summary)
    return summary


def _int8(onnx_path: Path, int8_path: Path, prepared_dir: str | Path, test: dict, params: ExportParams) -> dict:
    """Quantise ``onnx_path`` on val films into a temporary file beside ``int8_path``; rename it there only if it ties."""
    calibration_images = load_split(prepared_dir, "val")["images"][: params.int8_calibration_images]
    with atomic_path(int8_path) as tmp:
        quantize(onnx_path, tmp, calibration_images, reduce_range=params.int8_reduce_range)
        lungs = test["lungs"][:, 0].astype(bool) if "lungs" in test else None
        result = compare(onnx_path, tmp, test["images"], test["masks"][:, 0].astype(bool), lungs, name=int8_path)
        result |= {"calibration_images": int(len(calibration_images)), "int8_bytes": int(tmp.stat().st_size)}
    return result
