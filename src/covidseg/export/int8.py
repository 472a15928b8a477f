"""int8 beside fp32: a static QDQ quantisation of the exported ONNX model, kept only when its answers tie with fp32's.

What is quantised (onnxruntime ``quantize_static``, QDQ format): first the BatchNormalization nodes
are folded into their convolutions (onnxruntime's basic, hardware-independent rewrites), so no fp32
BatchNorm sits between two int8 ops; then the convolutions' weights per output channel to int8 and
the activations that flow between :data:`QUANTIZED_OPS` (Conv, Relu, MaxPool, ConvTranspose,
Concat) to uint8, ranges calibrated (MinMax) on val films. Each convolution runs as onnxruntime's
QLinearConv and activations stay 8-bit from one to the next (quantising the convolutions alone, with
BatchNorm unfolded, left an fp32 BatchNorm and a quantise/dequantise pair around each: 1.5x slower).
fp32 stay the convolutions that read the grey input and those that write the logits
(:func:`boundary_convs`; a flip-averaged graph holds two of each), whose resolution the temperature,
the lung gate and the threshold need, and everything after them: the calibration, flip averaging and
gating ops, which a whole-graph quantisation destroys (Dice 0). ``reduce_range`` stores 7-bit
weights, for CPUs without VNNI (AVX2 only), whose 8-bit kernels can saturate the int16 sum of two
products; with VNNI it is not needed.

The gate (:func:`compare`): on the test films, per-image Dice against the truth and the per-image
error of the per-lung infected share (mean over the image's lungs of |predicted - true|, points) are
computed for both models; the paired difference (int8 - fp32, with its bootstrap interval) ties
when its magnitude is at most the half-width of fp32's own 95 % bootstrap interval of that metric,
i.e. below what resampling the films alone moves it by.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from covidseg.atomic import atomic_path
from covidseg.evaluation.agreement import bootstrap_ci, paired_bootstrap_diff
from covidseg.evaluation.severity_intervals import lung_share_error
from covidseg.inference.onnx_runtime import INPUT_NAME, OnnxPredictor
from covidseg.masks.counts import confusion, dice
from covidseg.masks.severity import LUNG_THRESHOLD, image_severity

_LOG = logging.getLogger(__name__)
QUANTIZATION_KEY = "covidseg.quantization"
QUANTIZED_OPS = ("Conv", "Relu", "MaxPool", "ConvTranspose", "Concat")
QUANTIZATION = (
    "int8 QDQ: BatchNorm folded; Conv weights per channel (int8), activations between Conv, Relu, MaxPool, "
    "ConvTranspose and Concat uint8, MinMax on val; the Convs reading the grey input and writing the logits fp32"
)


class Int8Mismatch(ValueError):
    """The int8 model's answers do not tie with fp32's (the message names the metric and the numbers)."""


def quantize(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: np.ndarray,
    batch_size: int = 8,
    reduce_range: bool = False,
) -> Path:
    """Atomically write the int8 QDQ model of ``fp32_path`` to ``out_path``, calibrated on uint8 (N, 1, S, S) images.

    The images are the model's own inputs (contrast-normalised as the file's metadata says).
    ``reduce_range``: 7-bit weights (for CPUs without VNNI; see the module doc). The covidseg
    metadata is kept and ``covidseg.quantization`` added (with "reduce_range" when set).
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

    source = onnx.load(str(fp32_path))
    with atomic_path(out_path) as tmp, _quiet_quantizer(), tempfile.TemporaryDirectory() as work:
        folded = Path(work) / "folded.onnx"
        _fold_batchnorm(fp32_path, folded)
        onnx.save(_share_identical_weights(onnx.load(str(folded))), str(folded))
        quantize_static(
            str(folded),
            str(tmp),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=boundary_convs(onnx.load(str(folded))),
        )
        model = onnx.load(str(tmp))
        del model.metadata_props[:]
        model.metadata_props.extend(source.metadata_props)
        entry = model.metadata_props.add()
        entry.key = QUANTIZATION_KEY
        entry.value = QUANTIZATION + ("; reduce_range (7-bit weights)" if reduce_range else "")
        onnx.save(model, str(tmp))
    return out_path


def boundary_convs(model) -> list[str]:
    """Names of the convolutions that stay fp32 in an ONNX ``model``: those reading the grey input (one input
    channel) and those whose output feeds no quantised op (the logits head). A flip-averaged graph holds the
    network twice, so there are two of each, not "the first and the last Conv" in node order."""
    weights = {w.name: w for w in model.graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    keep = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight = weights.get(node.input[1])
        reads_grey = weight is not None and len(weight.dims) > 1 and weight.dims[1] == 1
        feeds_head = not any(op in QUANTIZED_OPS for op in consumers.get(node.output[0], []))
        if reads_grey or feeds_head:
            keep.append(node.name)
    return keep


def _fold_batchnorm(fp32_path: Path, out_path: Path) -> None:
    """Write ``fp32_path`` with each BatchNormalization folded into the Conv before it (onnxruntime's basic
    graph rewrites: exact up to fp32 rounding and the same on every CPU, unlike its layout rewrites)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out_path)
    options.log_severity_level = 3
    ort.InferenceSession(str(fp32_path), options, providers=["CPUExecutionProvider"])


def _share_identical_weights(model):
    """``model`` with initializers of equal dtype, shape and bytes merged into one. Folding gives each Conv its own
    weight copy, and a flip-averaged graph holds the network twice: without this, each int8 weight is stored twice."""
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept = []
    for w in model.graph.initializer:
        key = (w.data_type, tuple(w.dims), w.raw_data or w.SerializeToString())
        if key in first:
            rename[w.name] = first[key]
        else:
            first[key] = w.name
            kept.append(w)
    if rename:
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for node in model.graph.node:
            for slot, name in enumerate(node.input):
                node.input[slot] = rename.get(name, name)
    return model


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
    return {"dice": d, "share_error": lung_share_error(shares, true_shares)}


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
