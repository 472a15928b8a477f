"""Check every metadata value a model file declares before anything runs: type, range, and that the network can
take the declared input size. A bad value is one :class:`ModelMetadataError` naming the file, the key and the value.

Both backends read the same keys (torch: the model file's payload; ONNX: ``covidseg.<key>`` strings,
JSON-decoded): ``size`` (int, 16..4096 pixels), ``threshold`` (absent/None, or a float in (0, 1)),
``temperature`` (a finite float > 0), ``lung_gate`` and ``flip_tta`` (JSON booleans: ``"no"`` is not
one), ``contrast`` (a known method). Torch's U-Net is fully convolutional, so its file cannot say
which size it was trained at: the check there is that ``size`` is a multiple of the network's stride;
an ONNX graph's input is fixed, so there ``size`` must equal the graph's input side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from covidseg.masks.share_interval import ShareInterval
from covidseg.params import CONTRAST_METHODS

MIN_SIZE, MAX_SIZE = 16, 4096


class ModelMetadataError(ValueError):
    """A model file whose metadata cannot be trusted (the message names the file, the key and the value)."""


def _bad_value(path: Path, key: str, value: Any, rule: str) -> ModelMetadataError:
    return ModelMetadataError(f"{path}: metadata {key} = {value!r} {rule}; the file is damaged or was edited by hand")


def _number_value(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_value(path, key, value, "is not a number")
    if not math.isfinite(value):
        raise _bad_value(path, key, value, "is not finite")
    return float(value)


def _flag_value(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad_value(path, key, value, "is not true or false")
    return value


def checked_meta(
    path: str | Path, meta: dict[str, Any], stride: int | None = None, graph_size: Any = None, prefix: str = ""
) -> dict:
    """The validated calibration and input keys of ``meta`` (size, threshold, temperature, lung_gate, flip_tta,
    contrast, share_interval), defaults filled in as the loaders always did; ModelMetadataError on the first bad one.

    ``stride``: the torch network's total stride (``size`` must be a multiple). ``graph_size``: the ONNX
    graph's fixed input side (``size`` must equal it; a symbolic dimension is not checked). ``prefix``: how
    the file spells the keys in messages (``covidseg.`` for ONNX metadata_props).
    """
    path = Path(path)

    def bad(key: str, value: Any, rule: str) -> ModelMetadataError:
        return _bad_value(path, prefix + key, value, rule)

    if "size" not in meta:
        raise ModelMetadataError(f"{path}: model file has no 'size' (the input size it was trained on)")
    size = meta["size"]
    if isinstance(size, bool) or not isinstance(size, int):
        raise bad("size", size, "is not a whole number of pixels")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise bad("size", size, f"is outside {MIN_SIZE}..{MAX_SIZE} pixels")
    if stride and size % stride:
        raise bad("size", size, f"is not a multiple of the network's stride {stride}")
    if isinstance(graph_size, int) and graph_size != size:
        raise bad("size", size, f"differs from the ONNX graph's input side {graph_size}")
    threshold = meta.get("threshold")
    if threshold is not None:
        threshold = _number_value(path, prefix + "threshold", threshold)
        if not 0.0 < threshold < 1.0:
            raise bad("threshold", meta["threshold"], "is outside (0, 1): it would mark everything or nothing")
    temperature = _number_value(path, prefix + "temperature", meta.get("temperature", 1.0))
    if temperature <= 0:
        raise bad("temperature", meta["temperature"], "is not > 0 (0 divides by zero, < 0 inverts the output)")
    contrast = meta.get("contrast", "none")
    if contrast not in CONTRAST_METHODS:
        raise bad("contrast", contrast, f"is not one of {', '.join(CONTRAST_METHODS)}")
    share_interval = meta.get("share_interval")
    if share_interval is not None:
        try:
            if not isinstance(share_interval, dict):
                raise ValueError("not a mapping")
            ShareInterval.from_meta(share_interval)
        except ValueError as exc:
            raise bad("share_interval", share_interval, f"is not a share interval ({exc})") from None
    return {
        "share_interval": share_interval,
        "size": size,
        "threshold": threshold,
        "temperature": temperature,
        "lung_gate": _flag_value(path, prefix + "lung_gate", meta.get("lung_gate", False)),
        "flip_tta": _flag_value(path, prefix + "flip_tta", meta.get("flip_tta", False)),
        "contrast": contrast,
    }


def decode_onnx_meta(path: str | Path, metadata: dict[str, str]) -> dict[str, Any]:
    """ONNX ``covidseg.<key>`` strings as values: each JSON-decoded (``"256"`` -> 256, ``"true"`` -> True), an
    empty threshold as None, ``contrast`` kept as text. A value that is not JSON is a ModelMetadataError."""
    out: dict[str, Any] = {}
    for key in ("size", "threshold", "temperature", "lung_gate", "flip_tta", "share_interval"):
        raw = metadata.get(f"covidseg.{key}")
        if raw is None or (key == "threshold" and raw == ""):
            continue
        try:
            out[key] = json.loads(raw)
        except ValueError:
            raise _bad_value(Path(path), f"covidseg.{key}", raw, "is not a JSON value") from None
    if "covidseg.contrast" in metadata:
        out["contrast"] = metadata["covidseg.contrast"]
    return out
