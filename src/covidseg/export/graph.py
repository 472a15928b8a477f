"""Export a trained covidseg U-Net to ONNX with its calibration baked in, and check parity with torch.

The exported graph maps ``image`` float32 (N, 1, S, S) in [0, 1] (uint8 / 255) to
``probability`` float32 (N, S, S), exactly what ``covidseg.inference.calibration.calibrated_probabilities``
computes (flip averaging, lung gating, temperature), and ``logits`` float32 (N, C, S, S), the
(flip-averaged) raw outputs. The batch axis is dynamic; S is fixed. The threshold, calibration and
contrast normalisation go into metadata_props (see ``covidseg.inference.onnx_runtime``, the
torch-free runner); the contrast normalisation is not in the graph, its callers apply it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidseg.atomic import atomic_path
from covidseg.data.contrast import check_method
from covidseg.inference.calibration import Calibration
from covidseg.inference.onnx_runtime import (
    CONTRAST_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    INPUT_NAME,
    OUTPUT_NAMES,
    OnnxPredictor,
)

PARITY_TOL = 1e-4  # fp32 max |p_torch - p_onnx|


class ParityError(ValueError):
    """The ONNX graph's probabilities differ from torch's by more than the tolerance (names the file)."""


class CalibratedUNet(nn.Module):
    """image (N, 1, S, S) in [0, 1] -> (calibrated probability (N, S, S), logits (N, C, S, S)).

    The same arithmetic as ``covidseg.inference.forward.predict_logits`` + ``probabilities`` in fp32.
    """

    def __init__(self, model: nn.Module, calibration: Calibration):
        super().__init__()
        self.model = model
        self.flip_tta = calibration.flip_tta
        self.lung_gate = calibration.lung_gate and model.config.out_channels > 1
        self.temperature = float(calibration.temperature)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image).float()
        if self.flip_tta:
            logits = 0.5 * (logits + self.model(torch.flip(image, dims=[3])).float().flip(dims=[3]))
        infection = torch.minimum(logits[:, 0], logits[:, 1]) if self.lung_gate else logits[:, 0]
        return torch.sigmoid(infection / self.temperature), logits


def export_onnx(
    model: nn.Module,
    path: str | Path,
    size: int,
    metadata: dict[str, str],
    opset: int = 18,
    calibration: Calibration = Calibration(),
    check: bool = True,
    contrast: str = "none",
) -> Path:
    """Atomically write ``model`` (a covidseg ``UNet``, eval mode on CPU) with ``calibration`` baked in to ``path``.

    Args:
        size: S, the input side in pixels (fixed in the graph; the batch axis is dynamic).
        metadata: extra metadata_props (str -> str), e.g. the training run; the ``covidseg.*`` keys
            (format version, size, config, calibration, threshold) are added here and cannot be overridden.
        opset: ONNX opset, >= 17. The default 18 is what torch's exporter emits natively; 17 works
            through onnx's version converter (the parity check covers it).
        check: before the file appears, compare its probabilities with torch's on a few fixed
            random images and raise :class:`ParityError` when they differ by more than 1e-4.
        contrast: the contrast normalisation the model was trained with (the model file's
            ``contrast``), recorded as ``covidseg.contrast``; the graph itself takes normalised images.
    Returns:
        ``path``.
    """
    path = Path(path)
    if opset < 17:
        raise ValueError(f"{path}: opset {opset} < 17 not supported")
    check_method(contrast, f"{path}: contrast")
    net = copy.deepcopy(getattr(model, "module", model)).float().cpu().eval()  # leave the caller's model as it is
    own = {
        FORMAT_KEY: FORMAT_VERSION,
        "covidseg.size": str(size),
        "covidseg.config": json.dumps(net.config.to_dict()),
        "covidseg.temperature": repr(float(calibration.temperature)),
        "covidseg.lung_gate": json.dumps(bool(calibration.lung_gate and net.config.out_channels > 1)),
        "covidseg.flip_tta": json.dumps(bool(calibration.flip_tta)),
        "covidseg.threshold": "" if calibration.threshold is None else repr(float(calibration.threshold)),
        CONTRAST_KEY: contrast,
    }
    clash = sorted(set(own) & set(metadata))
    if clash:
        raise ValueError(f"{path}: metadata keys {clash} are written by the exporter itself")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"{path}: metadata must map str to str; bad keys {bad}")

    wrapper = CalibratedUNet(net, calibration).eval()
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    # torch's default (dynamo, torch.export-based) exporter, which needs onnxscript; it traces
    # the wrapper once, so the Python branches on calibration become a fixed graph.
    with _quiet_exporter():
        program = _export(wrapper, example, opset)
    proto = program.model_proto
    _strip_source_locations(proto)
    del proto.metadata_props[:]
    for key, value in sorted({**metadata, **own}.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value

    import onnx

    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
        if check:
            images = np.random.default_rng(0).integers(0, 256, (2, 1, size, size), dtype=np.uint8)
            check_parity(lambda x: _torch_probabilities(net, calibration, x), tmp, images, name=path)
    return path


def _strip_source_locations(proto) -> None:
    """Drop the exporter's per-node debug metadata (Python stack traces with absolute source paths, FX
    node text), so the same weights give the same bytes from any clone or folder. The graph is untouched."""

    def clean(nodes) -> None:
        for node in nodes:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean(attr.g.node)
                for graph in attr.graphs:
                    clean(graph.node)

    clean(proto.graph.node)
    for function in proto.functions:
        clean(function.node)


def _torch_probabilities(net: nn.Module, calibration: Calibration, images: np.ndarray) -> np.ndarray:
    from covidseg.inference.calibration import calibrated_probabilities

    return calibrated_probabilities(net, images, torch.device("cpu"), "fp32", calibration)


def parity(model_torch_fn: Callable[[np.ndarray], np.ndarray], onnx_path: str | Path, images: np.ndarray) -> float:
    """max |torch - onnx| over calibrated probabilities of uint8 (N, 1, S, S) ``images``.

    ``model_torch_fn``: uint8 (N, 1, S, S) -> float32 (N, S, S) probabilities (e.g. ``calibrated_probabilities``).
    Both see ``images`` as they are (already contrast-normalised, like the prepared arrays): the
    graph is compared, not the runner's contrast step.
    """
    want = np.asarray(model_torch_fn(images), dtype=np.float32)
    got = OnnxPredictor(onnx_path).predict(images, normalised=True)
    if want.shape != got.shape:
        raise ParityError(f"{onnx_path}: ONNX output shape {got.shape} != torch {want.shape}")
    return float(np.abs(want - got).max()) if want.size else 0.0


def check_parity(
    model_torch_fn: Callable[[np.ndarray], np.ndarray],
    onnx_path: str | Path,
    images: np.ndarray,
    tol: float = PARITY_TOL,
    name: str | Path | None = None,
) -> float:
    """:func:`parity`, raising :class:`ParityError` naming the file (``name``, default ``onnx_path``) when > ``tol``."""
    diff = parity(model_torch_fn, onnx_path, images)
    if not diff <= tol:
        raise ParityError(f"{name or onnx_path}: ONNX probabilities differ from torch by {diff:.3g} > {tol:g} (fp32)")
    return diff


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what torch's exporter says that is no one's business here: that torchvision (which this
    project does without) is missing, and a FutureWarning from inside torch's pytree code."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _export(wrapper: nn.Module, example: torch.Tensor, opset: int):
    """``torch.onnx.export`` of ``wrapper`` (dynamo exporter, dynamic batch), returning its ONNXProgram."""
    return torch.onnx.export(
        wrapper,
        (example,),
        f=None,
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
        optimize=True,
        verbose=False,
    )
