"""The model behind ``covidseg predict``: a torch checkpoint (``model.pt``) or an exported ``model.onnx``.

Both become a :class:`LoadedModel`, whose ``run`` maps uint8 images (n, 1, S, S) to calibrated
infection probabilities float32 (n, S, S) and lung probabilities float32 (n, S, S) (None without a
lung head), so the image and output code of :mod:`covidseg.inference.predict` is shared. ``run``
first applies the contrast normalisation the model was trained with (the model file's
``contrast``, or the ONNX file's ``covidseg.contrast``; "none" for files without one), as
preprocessing did (:func:`covidseg.data.contrast.normalise_contrast`).

The ONNX path imports no torch (tests check it): torch, the checkpoint reader and the device
helpers are imported inside :func:`_prepare_torch` only. onnxruntime runs on the CPU; ``device``
and ``precision`` apply to the torch backend only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidseg.inference.model_meta import checked_meta
from covidseg.masks.share_interval import ShareInterval

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
_ONNX_FIRST_BYTE = b"\x08"  # an ONNX ModelProto starts with field 1 (ir_version), a varint

Runner = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run and the settings read from its file.

    ``run``: uint8 (n, 1, S, S) resized grey levels, before contrast normalisation -> (float32 (n, S, S)
    calibrated infection probabilities, float32 (n, S, S) lung probabilities or None for a model
    without a lung head).
    """

    run: Runner
    size: int  # S, the square input side in pixels
    threshold: float  # the option's, else the model file's val-tuned one, else 0.5
    threshold_source: str  # "option", "model" or "default"
    backend: str  # "torch" or "onnx"
    has_lung_head: bool
    provenance: dict = field(default_factory=dict)  # as written by training ({} when the file has none)
    description: str = ""  # how it runs, e.g. "torch on cpu, fp32"
    contrast: str = "none"  # the contrast normalisation ``run`` applies (covidseg.data.contrast)
    run_warnings: tuple[str, ...] = ()  # about how it runs here (e.g. bf16 emulated on this CPU)
    file_name: str = ""  # the model file's name (what a DICOM SEG says made it)
    file_sha256: str = ""  # of the model file's bytes (a DICOM SEG's UIDs depend on it)
    share_interval: ShareInterval | None = None  # the per-lung share interval fitted on val (None: none recorded)


def model_backend(path: str | Path) -> str:
    """``"onnx"`` or ``"torch"`` for a model file: by its first bytes (a zip is a torch checkpoint,
    a protobuf starting with ir_version is ONNX), else by its suffix (``.onnx``), else torch."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""  # the backend's loader reports the missing or unreadable file
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if path.suffix.lower() == ".onnx" or head.startswith(_ONNX_FIRST_BYTE):
        return "onnx"
    return "torch"


def load_any_model(
    model_path: str | Path,
    threshold: float | None = None,
    flip_tta: bool | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 8,
) -> LoadedModel:
    """Load ``model_path`` with the backend :func:`model_backend` picks.

    ``threshold`` None: the model's val-tuned threshold (0.5 if it has none); ``flip_tta`` None: as
    the model was calibrated. Raises FileNotFoundError / ValueError naming the model file,
    RuntimeError for an unusable device.
    """
    if model_backend(model_path) == "onnx":
        return _prepare_onnx(Path(model_path), threshold, flip_tta, batch_size)
    return _prepare_torch(Path(model_path), threshold, flip_tta, device, precision, batch_size)


def _pick_threshold(option: float | None, saved: float | None) -> tuple[float, str]:
    if option is not None:
        return float(option), "option"
    if saved is not None:
        return float(saved), "model"
    return 0.5, "default"


def _prepare_torch(
    path: Path, threshold: float | None, flip_tta: bool | None, device: str, precision: str, batch_size: int
) -> LoadedModel:
    from dataclasses import fields, replace

    from covidseg.data.contrast import normalise_contrast
    from covidseg.device import choose_device, choose_precision, cpu_has_native_bf16
    from covidseg.inference.calibration import Calibration, calibrated_outputs
    from covidseg.model.checkpoint import load_model

    torch_device = choose_device(device)
    model, meta = load_model(path, torch_device)
    config = model.config
    checked = checked_meta(path, meta, stride=2 ** (config.depth - 1) * config.downsample)
    saved = Calibration(**{f.name: checked[f.name] for f in fields(Calibration)})
    value, source = _pick_threshold(threshold, saved.threshold)
    calibration = replace(saved, threshold=value, flip_tta=saved.flip_tta if flip_tta is None else flip_tta)
    chosen = choose_precision(torch_device, precision)
    run_warnings = []
    if chosen == "bf16" and torch_device.type == "cpu" and not cpu_has_native_bf16():
        run_warnings.append(
            "WARNING: --precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): torch emulates it, "
            "several times slower than fp32. Use --precision fp32 (the default) on this machine."
        )
    contrast = checked["contrast"]

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        images = normalise_contrast(images[:, 0], contrast)[:, None]
        return calibrated_outputs(model, images, torch_device, chosen, calibration, batch_size=batch_size)

    provenance = meta.get("provenance")
    return LoadedModel(
        run=run,
        size=checked["size"],
        threshold=value,
        threshold_source=source,
        backend="torch",
        has_lung_head=config.out_channels > 1,
        provenance=provenance if isinstance(provenance, dict) else {},
        description=f"torch on {torch_device.type}, {chosen}" + _contrast_note(contrast),
        contrast=contrast,
        run_warnings=tuple(run_warnings),
        file_name=path.name,
        file_sha256=_sha256(path),
        share_interval=ShareInterval.from_meta(checked["share_interval"]),
    )


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _contrast_note(contrast: str) -> str:
    return "" if contrast == "none" else f", contrast {contrast}"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 sigmoid, without overflow warnings for large negative inputs."""
    x = x.astype(np.float32, copy=False)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def _prepare_onnx(path: Path, threshold: float | None, flip_tta: bool | None, batch_size: int) -> LoadedModel:
    from covidseg.inference.onnx_runtime import OnnxPredictor

    # No spinning: predict decodes and writes files in threads beside the model, which need the cores.
    predictor = OnnxPredictor(
        path, spinning=False
    )  # FileNotFoundError, or OnnxModelError (a ValueError) naming the file
    baked = bool(predictor.calibration["flip_tta"])
    if flip_tta is not None and flip_tta != baked:
        raise ValueError(
            f"{path}: flip TTA is {'on' if baked else 'off'} inside this ONNX graph and cannot be switched "
            f"{'off' if baked else 'on'}; drop --{'no-' if baked else ''}flip-tta or use the torch model file"
        )
    value, source = _pick_threshold(threshold, predictor.threshold)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probs, logits = predictor.run(images, batch_size=batch_size)
        # The graph's logits are already flip-averaged; the lung probability has no temperature, as in torch.
        return probs, (_sigmoid(logits[:, 1]) if logits.shape[1] > 1 else None)

    channels = predictor.session.get_outputs()[1].shape[1]
    if not isinstance(channels, int):  # not fixed in the graph: read it from the recorded config
        channels = int(json.loads(predictor.metadata.get("covidseg.config", "{}")).get("out_channels", 1))
    return LoadedModel(
        run=run,
        size=predictor.size,
        threshold=value,
        threshold_source=source,
        backend="onnx",
        has_lung_head=channels > 1,
        provenance=_onnx_provenance(predictor.metadata),
        description="onnxruntime on cpu, fp32" + _contrast_note(predictor.contrast),
        contrast=predictor.contrast,
        file_name=path.name,
        file_sha256=_sha256(path),
        share_interval=ShareInterval.from_meta(predictor.share_interval),
    )


def _onnx_provenance(metadata: dict[str, str]) -> dict:
    """The training provenance an exporter stored as JSON under ``covidseg.provenance`` ({} when absent or bad)."""
    try:
        value = json.loads(metadata.get("covidseg.provenance", "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def provenance_lines(prepared: LoadedModel) -> list[str]:
    """What the model was trained on, for the user: one or two lines, or a note that the file does not say."""
    p = prepared.provenance
    if not p:
        return [f"model: the file records no provenance (data source, val Dice); runs with {prepared.description}"]
    counts = ", ".join(f"{k} {v}" for k, v in p.get("split_counts", {}).items())
    val = p.get("val_dice")
    return [
        f"model: trained on {p.get('data_source', 'unknown')} ({counts or 'split sizes unknown'}; "
        f"{p.get('train_images', '?')} training images), val Dice {val:.3f}"
        if isinstance(val, float)
        else f"model: trained on {p.get('data_source', 'unknown')} ({counts or 'split sizes unknown'})",
        f"model: covidseg {p.get('package_version', '?')}, training code {str(p.get('code_hash', '?'))[:12]}; "
        f"runs with {prepared.description}",
    ]


def model_warnings(prepared: LoadedModel) -> list[str]:
    """Loud warnings about the model itself (printed even with --quiet)."""
    warnings = []
    if prepared.provenance.get("synthetic"):
        warnings.append(
            "WARNING: this model was trained on the built-in SYNTHETIC data set, not on real X-rays: "
            "its masks mean nothing clinically. Set data.source to the COVID-QU-Ex data and rerun `dvc repro`."
        )
    if not prepared.has_lung_head:
        warnings.append(
            "WARNING: this model has no lung head, so it cannot measure severity: no lungs/ masks are written and "
            "the severity columns of predictions.csv stay empty. Retrain with train.lung_aux_weight > 0."
        )
    return warnings + list(prepared.run_warnings)
