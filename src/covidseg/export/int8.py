"""int8 beside fp32: a static QDQ quantisation of the exported ONNX model, kept only when its answers tie with fp32's.

What is quantised (onnxruntime ``quantize_static``, QDQ format): the convolutions' weights per output
channel to int8 and their input activations to uint8, with ranges calibrated (MinMax) on val
films. The first and the last convolution stay fp32 (the grey input and the logits that the
temperature, the lung gate and the threshold read need the resolution), and so does everything
that is not a convolution: the calibration, flip averaging and gating ops, which a whole-graph
quantisation destroys (Dice 0).

The gate (:func:`compare`): on the test films, per-image Dice against the truth and the per-image
error of the per-lung infected share (mean over the image's lungs of |predicted - true|, points) are
computed for both models; the paired difference (int8 - fp32, with its bootstrap interval) ties
when its magnitude is at most the half-width of fp32's own 95 % bootstrap interval of that metric,
i.e. below what resampling the films alone moves it by.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from covidseg.atomic import atomic_path
from covidseg.evaluation.agreement import bootstrap_ci, paired_bootstrap_diff
from covidseg.inference.onnx_runtime import INPUT_NAME, OnnxPredictor
from covidseg.masks.counts import confusion, dice
from covidseg.masks.severity import LUNG_THRESHOLD, image_severity

_LOG = logging.getLogger(__name__)
QUANTIZATION_KEY = "covidseg.quantization"
QUANTIZATION = "int8 QDQ: Conv weights per channel (int8), activations uint8, MinMax on val; first and last Conv fp32"


class Int8Mismatch(ValueError):
    """The int8 model's answers do not tie with fp32's (the message names the metric and the numbers)."""


def quantize(fp32_path: str | Path, out_path: str | Path, calibration_images: np.ndarray, batch_size: int = 8) -> Path:
    """Atomically write the int8 QDQ model of ``fp32_path`` to ``out_path``, calibrated on uint8 (N, 1, S, S) images.

    The images are the model's own inputs (contrast-normalised as the file's metadata says).
    The covidseg metadata is kept and ``covidseg.quantization`` added.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if len(calibration_images) == 0:
        raise ValueError(f"{fp32_path}: no calibration images for the int8 quantisation")
    x = np.asarray(calibration_images, np.float32) / np.float32(255.0)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict | None:
            if self.start >= len(x):
                return None
            batch = x[self.start : self.start + batch_size]
            self.start += batch_size
            return {INPUT_NAME: batch}

    convs = [n.name for n in onnx.load(str(fp32_path)).graph.node if n.op_type == "Conv"]
    with atomic_path(out_path) as tmp, _quiet_quantizer():
        quantize_static(
            str(fp32_path),
            str(tmp),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=[convs[0], convs[-1]] if len(convs) > 2 else convs,
        )
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = QUANTIZATION_KEY, QUANTIZATION
        onnx.save(model, str(tmp))
    return out_path


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop onnxruntime's advice to pre-process (it logs it on the root logger); a handler on the root logger
    meanwhile keeps ``logging.warning`` from configuring it (basicConfig), which would repeat every log line."""
    root = logging.getLogger()
    handler = logging.NullHandler()
    advice = logging.Filter()
    advice.filter = lambda record: not record.getMessage().startswith("Please consider")  # type: ignore[method-assign]
    root.addHandler(handler)
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
        root.removeHandler(handler)


def _scores(predictor: OnnxPredictor, images: np.ndarray, truth: np.ndarray, true_shares: np.ndarray) -> dict:
    """Per-image Dice (N,) and per-image mean per-lung share error (N,) in points, NaN where undefined."""
    prob, logits = predictor.run(images, normalised=True)
    pred = prob >= predictor.threshold
    d = dice(confusion(pred, truth))
    if logits.shape[1] < 2:
        return {"dice": d, "share_error": np.full(len(d), np.nan)}
    lungs = 1.0 / (1.0 + np.exp(-logits[:, 1])) >= LUNG_THRESHOLD
    shares = np.array([[s["right_pct"], s["left_pct"]] for s in map(image_severity, pred, lungs)], np.float64)
    with np.errstate(all="ignore"):
        error = np.nanmean(np.abs(shares - true_shares), axis=1)  # NaN when no lung pair is defined
    return {"dice": d, "share_error": error}


def compare(
    fp32_path: str | Path,
    int8_path: str | Path,
    images: np.ndarray,
    truth: np.ndarray,
    true_lungs: np.ndarray | None,
    n_resamples: int = 1000,
    name: str | Path | None = None,
) -> dict:
    """The int8 model against fp32 on uint8 (N, 1, S, S) ``images`` (already contrast-normalised) with bool (N, S, S)
    ``truth`` and ``true_lungs``; raises Int8Mismatch when a metric does not tie.

    Returns per metric (``dice``, ``share_error``): fp32's and int8's means, the paired difference with its
    95 % interval, fp32's interval half-width (the tie margin) and ``tie``. ``name``: how messages call the
    int8 file (default ``int8_path``; the stage passes the final name of a file still being written).
    """
    fp32, int8 = OnnxPredictor(fp32_path), OnnxPredictor(int8_path)
    if fp32.threshold is None:
        raise ValueError(f"{fp32_path}: the model has no tuned threshold (metadata covidseg.threshold)")
    true_shares = np.full((len(truth), 2), np.nan)
    if true_lungs is not None:
        true = [image_severity(t, lung) for t, lung in zip(truth, true_lungs)]
        true_shares = np.array([[s["right_pct"], s["left_pct"]] for s in true], np.float64)
    a, b = _scores(fp32, images, truth, true_shares), _scores(int8, images, truth, true_shares)
    out = {"images": int(len(images))}
    for metric in ("dice", "share_error"):
        if not np.isfinite(a[metric]).any():
            continue  # no lung head, or no lungs found: no share to compare
        low, high = bootstrap_ci(a[metric], n_resamples=n_resamples)
        diff = paired_bootstrap_diff(b[metric], a[metric], n_resamples=n_resamples)
        margin = (high - low) / 2
        out[metric] = {
            "fp32": float(np.nanmean(a[metric])),
            "int8": float(np.nanmean(b[metric])),
            "difference": diff.diff,
            "difference_ci95": [diff.low, diff.high],
            "margin": float(margin),
            "tie": bool(abs(diff.diff) <= margin),
        }
    bad = [k for k in ("dice", "share_error") if k in out and not out[k]["tie"]]
    if bad:
        k = bad[0]
        raise Int8Mismatch(
            f"{name or int8_path}: int8 does not tie with fp32 on {k}: difference {out[k]['difference']:+.4f} "
            f"[{out[k]['difference_ci95'][0]:+.4f}, {out[k]['difference_ci95'][1]:+.4f}] is not within fp32's "
            f"interval half-width {out[k]['margin']:.4f} ({len(images)} test films); the int8 file was not kept"
        )
    return out
