"""Run an exported covidseg model (.onnx) with onnxruntime on CPU, without torch.

The graph (written by ``covidseg.export.graph``) has calibration baked in: input ``image`` float32
(N, 1, S, S) in [0, 1]; outputs ``probability`` float32 (N, S, S), the calibrated infection
probability (flip averaging, lung gating and temperature included), and ``logits`` float32
(N, C, S, S), the (flip-averaged) raw model outputs. Its metadata_props record the calibration, the
tuned threshold and ``covidseg.contrast``, the contrast normalisation the model was trained with
(none, equalize or clahe; "none" when absent). The graph does not apply it: a caller of the raw
graph must apply :func:`covidseg.data.contrast.normalise_contrast` to the uint8 images first, as
:class:`OnnxPredictor` does, so any ONNX consumer can reproduce ``covidseg predict``.

This module must not import torch (tests check it): it is what ships with the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covidseg.data.contrast import normalise_contrast
from covidseg.inference.model_meta import ModelMetadataError, checked_meta, decode_onnx_meta

FORMAT_KEY = "covidseg.format_version"
FORMAT_VERSION = "1"
INPUT_NAME = "image"
OUTPUT_NAMES = ("probability", "logits")
REQUIRED_KEYS = (FORMAT_KEY, "covidseg.size", "covidseg.temperature", "covidseg.lung_gate", "covidseg.flip_tta")
CONTRAST_KEY = "covidseg.contrast"  # optional: files written before it existed mean "none"


class OnnxModelError(ValueError):
    """An .onnx file that is not a usable covidseg model (the message names the file)."""


class OnnxPredictor:
    """Calibrated infection probabilities from a covidseg .onnx file.

    Attributes:
        path: the .onnx file.
        metadata: its metadata_props (str -> str).
        size: S, the square input side in pixels the graph expects.
        threshold: the probability threshold tuned on val, or None when the file has none.
        contrast: the contrast normalisation :meth:`run` applies first (``covidseg.contrast``).
    """

    def __init__(self, path: str | Path, threads: int = 0, spinning: bool = True):
        """``threads``: onnxruntime intra-op threads (0: its default, one per core). ``spinning`` False: idle
        threads sleep instead of spinning, which leaves the cores to other work between runs (predict's
        decoding and writing threads; benchmarks/results/inference.md)."""
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model file not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise OnnxModelError(f"{self.path}: not a loadable ONNX model ({exc})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED_KEYS if k not in self.metadata]
        if missing:
            raise OnnxModelError(f"{self.path}: not a covidseg ONNX model (metadata lacks {', '.join(missing)})")
        if self.metadata[FORMAT_KEY] != FORMAT_VERSION:
            raise OnnxModelError(
                f"{self.path}: covidseg ONNX format version {self.metadata[FORMAT_KEY]!r}, "
                f"this code reads {FORMAT_VERSION!r}"
            )
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or OUTPUT_NAMES[0] not in outputs:
            raise OnnxModelError(
                f"{self.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAMES[0]!r}, "
                f"got inputs {inputs} and outputs {outputs}"
            )
        graph_side = self.session.get_inputs()[0].shape[-1]
        try:
            self._checked = checked_meta(
                self.path, decode_onnx_meta(self.path, self.metadata), graph_size=graph_side, prefix="covidseg."
            )
        except ModelMetadataError as exc:
            raise OnnxModelError(str(exc)) from None
        self.size: int = self._checked["size"]
        self.threshold: float | None = self._checked["threshold"]
        self.contrast: str = self._checked["contrast"]
        self.share_interval: dict | None = self._checked["share_interval"]  # covidseg.masks.share_interval

    @property
    def calibration(self) -> dict[str, Any]:
        """The calibration baked into the graph: temperature, lung_gate, flip_tta, threshold."""
        return {k: self._checked[k] for k in ("temperature", "lung_gate", "flip_tta", "threshold")}

    def predict(self, images: np.ndarray, batch_size: int = 16, normalised: bool = False) -> np.ndarray:
        """float32 (N, S, S) calibrated probabilities for uint8 (N, 1, S, S) grey levels 0..255 (see :meth:`run`)."""
        return self.run(images, batch_size, normalised)[0]

    def run(self, images: np.ndarray, batch_size: int = 16, normalised: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(probability float32 (N, S, S), logits float32 (N, C, S, S)) for uint8 (N, 1, S, S) images.

        The images are contrast-normalised by the file's method first, unless ``normalised`` says
        they already are (e.g. the prepared arrays the pipeline trained and evaluates on).
        """
        images = np.asarray(images)
        s = self.size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (1, s, s):
            raise ValueError(f"{self.path}: expects uint8 images (N, 1, {s}, {s}), got {images.dtype} {images.shape}")
        if not normalised and self.contrast != "none":
            images = normalise_contrast(images[:, 0], self.contrast)[:, None]
        probs, logits = [], []
        for start in range(0, images.shape[0], batch_size):
            # Same float32 division as covidseg.inference.forward, so both see bit-identical inputs.
            x = images[start : start + batch_size].astype(np.float32) / np.float32(255.0)
            p, lg = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
            probs.append(p)
            logits.append(lg)
        if not probs:
            n_out = self.session.get_outputs()[1].shape[1]
            return np.zeros((0, s, s), np.float32), np.zeros((0, n_out, s, s), np.float32)
        return np.concatenate(probs).astype(np.float32, copy=False), np.concatenate(logits).astype(
            np.float32, copy=False
        )

    def masks(self, images: np.ndarray, batch_size: int = 16, normalised: bool = False) -> np.ndarray:
        """bool (N, S, S): probability >= the file's threshold (an error when the file has none)."""
        if self.threshold is None:
            raise ValueError(f"{self.path}: the model has no tuned threshold (metadata covidseg.threshold)")
        return self.predict(images, batch_size, normalised) >= self.threshold
