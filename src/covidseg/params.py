"""Typed, validated views of ``params.yaml`` sections, one dataclass per pipeline stage.

Each stage declares only the keys it reads in ``dvc.yaml``; these classes are the single
place where a key's type and allowed range live. ``params.yaml`` is what DVC tracks, so its values
are the defaults: every dataclass default equals the file's value (tests/test_params.py holds them
together), and a key missing from the file falls back to that same value.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_SEED = 42  # params.yaml's top-level ``seed``; the one fallback when a file has none
CLASSES = ("COVID-19", "Non-COVID", "Normal")  # the dataset's classes, also its folder names
NEGATIVE_CLASSES = CLASSES[1:]  # no infection: their infection masks are empty
CONTRAST_METHODS = ("none", "equalize", "clahe")  # the values of preprocess.contrast (covidseg.data.contrast)
LOSSES = ("bce", "dice", "bce_dice", "focal", "bce_tversky", "bce_focal_tversky", "bce_lovasz")
SCHEDULES = ("constant", "cosine")
# train.unlabeled: where self-training's unlabeled films come from (covidseg.training.self_training)
UNLABELED_SOURCES = ("none", "archive", "rest_of_train")


class ParamsError(ValueError):
    """A params section is missing, has unknown keys, or holds a value out of range."""


def _check(cond: bool, section: str, message: str) -> None:
    if not cond:
        raise ParamsError(f"params '{section}': {message}")


def architecture_problems(base_channels: int, depth: int, downsample: int) -> list[str]:
    """What is wrong with a U-Net size (empty when nothing): the one place its ranges are checked.

    Used for ``train.*`` params and by :class:`covidseg.model.unet.UNetConfig` (so a model file
    with an impossible config is refused the same way).
    """
    problems = []
    if base_channels < 4:
        problems.append("base_channels must be >= 4")
    if not 1 <= depth <= 6:
        problems.append("depth must be in [1, 6]")
    if downsample not in (1, 2, 4):
        problems.append("downsample must be 1, 2 or 4")
    return problems


@dataclasses.dataclass(frozen=True)
class LaunchParams:
    """How DVC starts the train stage (read by dvc.yaml, checked here)."""

    train: str = "python"

    def validate(self) -> None:
        _check(
            bool(self.train.split()),
            "launch",
            "train must be a command such as 'python' or 'torchrun --nproc-per-node=2'",
        )


@dataclasses.dataclass(frozen=True)
class SynthParams:
    """Size of the built-in synthetic dataset (per split, COVID-19 images; negatives per class)."""

    train: int = 96
    val: int = 24
    test: int = 24
    negatives: int = 4
    image_size: int = 256
    unlabeled: int = 24  # COVID-19 films of the lung half only (self-training's unlabeled films)

    def validate(self) -> None:
        for name in ("train", "val", "test"):
            _check(getattr(self, name) >= 1, "synth", f"{name} must be >= 1")
        _check(self.negatives >= 0, "synth", "negatives must be >= 0")
        _check(self.unlabeled >= 0, "synth", "unlabeled must be >= 0")
        _check(32 <= self.image_size <= 2048, "synth", "image_size must be in [32, 2048]")


@dataclasses.dataclass(frozen=True)
class DataParams:
    """Where the raw data comes from and what to take from it."""

    source: str = "data/raw/synthetic"
    classes: tuple[str, ...] = ("COVID-19",)
    on_error: str = "skip"
    # A manifest without a split column (covidseg.data.manifest): the seeded split's shares and seed.
    val_fraction: float = 0.16
    test_fraction: float = 0.2
    split_seed: int = 0
    # Also extract the archive's Lung Segmentation Data COVID-19 films (lung masks, no infection mask)
    # for self-training (train.unlabeled: archive); films equal in pixels to a labelled one are left out.
    unlabeled: bool = False

    def validate(self) -> None:
        _check(bool(self.source), "data", "source must name a folder, a .zip or a manifest folder")
        for name in ("val_fraction", "test_fraction"):
            _check(0 < getattr(self, name) < 1, "data", f"{name} must lie strictly between 0 and 1")
        _check(self.val_fraction + self.test_fraction < 1, "data", "val_fraction + test_fraction must be below 1")
        _check(self.split_seed >= 0, "data", "split_seed must be a non-negative integer")
        _check(len(self.classes) >= 1, "data", "classes must name at least one class")
        for c in self.classes:
            _check(c in CLASSES, "data", f"unknown class {c!r}; choose from {list(CLASSES)}")
        _check("COVID-19" in self.classes, "data", "classes must include 'COVID-19' (the infected class)")
        _check(self.on_error in ("skip", "fail"), "data", "on_error must be 'skip' or 'fail'")


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
    """Side length (pixels) of the square tensors the model sees, and their contrast normalisation."""

    image_size: int = 256
    contrast: str = "none"  # none, equalize or clahe (covidseg.data.contrast)

    def validate(self) -> None:
        _check(
            32 <= self.image_size <= 1024 and self.image_size % 16 == 0,
            "preprocess",
            "image_size must be a multiple of 16 in [32, 1024]",
        )
        _check(self.contrast in CONTRAST_METHODS, "preprocess", f"contrast must be one of {list(CONTRAST_METHODS)}")


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """Model, loss, optimiser and augmentation settings; defaults are the report's setup."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: int = 0
    loss: str = "bce"
    focal_gamma: float = 2.0
    tversky_alpha: float = 0.7
    tversky_gamma: float = 0.75
    pos_weight: float = 1.0
    lung_aux_weight: float = 0.5
    lung_crop: bool = False
    base_channels: int = 16
    depth: int = 4
    downsample: int = 2
    attention: bool = False
    augment: bool = False
    aug_flip: bool = True
    aug_rotate_deg: float = 10.0
    aug_scale: float = 0.1
    aug_brightness: float = 0.1
    aug_contrast: float = 0.1
    aug_gamma: float = 0.15
    patience: int = 0
    ema_decay: float = 0.0
    snapshots: int = 1
    temperature_scaling: bool = True
    flip_tta: bool = False
    device: str = "auto"
    precision: str = "fp32"  # the default params train in fp32 on every machine; presets may pick auto
    num_threads: int = 0
    max_train_images: int = 0
    members: int = 1  # >= 2: an ensemble of that many independent runs, seeds seed .. seed + members - 1
    unlabeled: str = "none"  # UNLABELED_SOURCES: self-training on films without an infection mask
    pseudo_keep: float = 0.8  # the share of unlabeled films (the teacher's most stable) that the student learns from

    def validate(self) -> None:
        s = "train"
        _check(self.epochs >= 1, s, "epochs must be >= 1")
        _check(self.batch_size >= 1, s, "batch_size must be >= 1")
        _check(0 < self.lr < 1, s, "lr must be in (0, 1)")
        _check(self.weight_decay >= 0, s, "weight_decay must be >= 0")
        _check(self.schedule in SCHEDULES, s, f"schedule must be one of {list(SCHEDULES)}")
        _check(0 <= self.warmup_epochs < self.epochs, s, "warmup_epochs must be in [0, epochs)")
        _check(self.loss in LOSSES, s, f"loss must be one of {list(LOSSES)}")
        _check(self.focal_gamma >= 0, s, "focal_gamma must be >= 0")
        _check(
            0 < self.tversky_alpha < 1,
            s,
            "tversky_alpha must be in (0, 1) (0.5: soft Dice; > 0.5 charges false positives more)",
        )
        _check(0 < self.tversky_gamma <= 3, s, "tversky_gamma must be in (0, 3] (1: plain Tversky; < 1: focal Tversky)")
        _check(self.pos_weight > 0, s, "pos_weight must be > 0")
        _check(self.lung_aux_weight >= 0, s, "lung_aux_weight must be >= 0")
        _check(
            not self.lung_crop or self.lung_aux_weight > 0,
            s,
            "lung_crop needs the lung head to find the lungs: set lung_aux_weight > 0",
        )
        for problem in architecture_problems(self.base_channels, self.depth, self.downsample):
            _check(False, s, problem)
        _check(0 <= self.aug_rotate_deg <= 45, s, "aug_rotate_deg must be in [0, 45]")
        for name in ("aug_scale", "aug_brightness", "aug_contrast", "aug_gamma"):
            _check(0 <= getattr(self, name) < 1, s, f"{name} must be in [0, 1)")
        _check(self.patience >= 0, s, "patience must be >= 0 (0 disables early stopping)")
        _check(0 <= self.ema_decay < 1, s, "ema_decay must be in [0, 1) (0: no weight averaging)")
        _check(
            1 <= self.snapshots <= self.epochs,
            s,
            f"snapshots must be in [1, epochs={self.epochs}] (1: off; K >= 2: average the last K epochs' models)",
        )
        _check(
            self.snapshots == 1 or self.ema_decay == 0,
            s,
            "snapshots >= 2 cannot be combined with ema_decay > 0 (choose one: a snapshot ensemble "
            "or a weight average)",
        )
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            s,
            "device must be auto, cpu or cuda[:N]",
        )
        _check(self.precision in ("auto", "fp32", "bf16"), s, "precision must be auto, fp32 or bf16")
        _check(self.num_threads >= 0, s, "num_threads must be >= 0 (0: torch's default)")
        _check(self.max_train_images >= 0, s, "max_train_images must be >= 0 (0: all)")
        _check(1 <= self.members <= 10, s, "members must be in [1, 10] (1: one model; K >= 2: K independent runs)")
        _check(
            self.members == 1 or self.snapshots == 1,
            s,
            "members >= 2 cannot be combined with snapshots >= 2 (choose one ensemble: of runs or of epochs)",
        )
        _check(self.unlabeled in UNLABELED_SOURCES, s, f"unlabeled must be one of {list(UNLABELED_SOURCES)}")
        _check(
            self.unlabeled == "none" or self.members == 1,
            s,
            "unlabeled (self-training) cannot be combined with members >= 2",
        )
        _check(
            self.unlabeled == "none" or self.snapshots == 1,
            s,
            "unlabeled (self-training) cannot be combined with snapshots >= 2 (the teacher is one network)",
        )
        _check(
            self.unlabeled != "rest_of_train" or self.max_train_images > 0,
            s,
            "unlabeled: rest_of_train needs max_train_images > 0 (the labelled films; the other train films "
            "lose their infection masks)",
        )
        _check(0 < self.pseudo_keep <= 1, s, "pseudo_keep must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """Evaluation settings: the fixed threshold, the calibration bin count, intervals and precision.

    ``precision`` is fp32 by default so that a model file's test metrics do not depend on the CPU
    (``auto`` would take bf16 where the CPU has it natively, and bf16 moves pixel probabilities).
    """

    threshold: float = 0.5
    calibration_bins: int = 15
    bootstrap_resamples: int = 1000
    precision: str = "fp32"

    def validate(self) -> None:
        _check(self.precision in ("auto", "fp32", "bf16"), "evaluate", "precision must be auto, fp32 or bf16")
        _check(0 < self.threshold < 1, "evaluate", "threshold must be in (0, 1)")
        _check(2 <= self.calibration_bins <= 100, "evaluate", "calibration_bins must be in [2, 100]")
        _check(100 <= self.bootstrap_resamples <= 100_000, "evaluate", "bootstrap_resamples must be in [100, 100000]")


@dataclasses.dataclass(frozen=True)
class PlotsParams:
    """Which images the figures show."""

    sample_index: int = 0
    gallery_size: int = 3
    dpi: int = 100

    def validate(self) -> None:
        _check(self.sample_index >= 0, "plots", "sample_index must be >= 0")
        _check(1 <= self.gallery_size <= 10, "plots", "gallery_size must be in [1, 10]")
        _check(50 <= self.dpi <= 300, "plots", "dpi must be in [50, 300]")


@dataclasses.dataclass(frozen=True)
class ExportParams:
    """ONNX export: opset, the fp32 parity check against torch on the test images, and the int8 model's
    calibration (the first ``int8_calibration_images`` val films; covidseg.export.int8) and whether its weights
    use 7 bits (``int8_reduce_range``, for CPUs without VNNI)."""

    opset: int = 18
    parity_tolerance: float = 0.0001
    parity_images: int = 0
    int8_calibration_images: int = 64
    int8_reduce_range: bool = False

    def validate(self) -> None:
        _check(self.opset >= 17, "export", "opset must be >= 17 (older Resize does not match torch's bilinear)")
        _check(0 < self.parity_tolerance <= 0.01, "export", "parity_tolerance must be in (0, 0.01]")
        _check(self.parity_images >= 0, "export", "parity_images must be >= 0 (0: every test image)")
        _check(self.int8_calibration_images >= 1, "export", "int8_calibration_images must be >= 1 (val films)")


SECTIONS: dict[str, type] = {
    "launch": LaunchParams,
    "synth": SynthParams,
    "data": DataParams,
    "preprocess": PreprocessParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "plots": PlotsParams,
}
TOP_LEVEL = ("seed", *SECTIONS)
# A plain decimal or scientific number: what YAML 1.1 leaves as text when written like `1e-3`.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file in any error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


# Keys renamed since earlier versions: refused with the new name, never silently ignored or mapped.
RENAMED_KEYS = {
    "train": {
        "flip": "aug_flip",
        "rotate_deg": "aug_rotate_deg",
        "scale": "aug_scale",
        "brightness": "aug_brightness",
        "contrast": "aug_contrast",
        "gamma": "aug_gamma",
    },
}


def from_dict(cls: type[T], section: str, raw: Any) -> T:
    """Build and validate the dataclass ``cls`` from a mapping, rejecting unknown keys and bad types."""
    if raw is None:
        raw = {}
    _check(isinstance(raw, dict), section, "expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = {k: v for k, v in RENAMED_KEYS.get(section, {}).items() if k in raw}
    _check(
        not renamed,
        section,
        "renamed keys: "
        + ", ".join(f"{k!r} is now {v!r}" for k, v in sorted(renamed.items()))
        + " (augmentation keys take aug_)",
    )
    unknown = sorted(set(raw) - set(fields))
    _check(not unknown, section, f"unknown keys {unknown}; known keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{section}.{name}")
    obj = cls(**values)
    obj.validate()  # type: ignore[attr-defined]
    return obj


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params '{where}': expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params '{where}': expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params '{where}': expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # PyYAML reads `1e-3` (no dot) as text
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamsError(f"params '{where}': expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"params '{where}': expected a string, got {value!r}")
        return value
    return value


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The params file as a mapping, refusing a top-level key that no stage reads (e.g. a misspelt ``trian:``)."""
    data = read_yaml(path)
    unknown = sorted(map(str, set(data) - set(TOP_LEVEL)))
    if unknown:
        raise ParamsError(
            f"{path}: unknown top-level section(s) {unknown} (misspelt?); known ones are {list(TOP_LEVEL)}"
        )
    return data


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """Load ``section`` of the params file into ``cls``."""
    return from_dict(cls, section, read_params(path).get(section))


def load_seed(path: str | Path = "params.yaml") -> int:
    """The shared integer seed at the top level of the params file (:data:`DEFAULT_SEED` when absent)."""
    seed = read_params(path).get("seed", DEFAULT_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParamsError(f"{path}: 'seed' must be a non-negative integer, got {seed!r}")
    return seed


def validate_all(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load and validate the seed and every section; returns {section: dataclass, "seed": int}."""
    loaded: dict[str, Any] = {name: load_section(cls, name, path) for name, cls in SECTIONS.items()}
    loaded["seed"] = load_seed(path)
    train, size = loaded["train"], loaded["preprocess"].image_size
    step = train.downsample * 2 ** (train.depth - 1)
    _check(
        size % step == 0,
        "train",
        f"preprocess.image_size {size} must be divisible by downsample * 2 ** (depth - 1) = {step} "
        "(the U-Net halves the image depth - 1 times after downsampling)",
    )
    _check(
        train.unlabeled != "archive" or loaded["data"].unlabeled,
        "train",
        "unlabeled: archive needs data.unlabeled: true (extract the archive's Lung Segmentation Data films)",
    )
    return loaded


def _flag_value(value: Any) -> str:
    """A params value as DVC's ``-S key=value`` reads it (YAML): true/false, numbers, [a,b] lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_flag_value(v) for v in value) + "]"
    return str(value)


PRESET_EXTENDS = "extends"  # a preset's key naming the preset it builds on (a path relative to it)


def read_preset(preset_path: str | Path) -> dict[str, dict[str, Any]]:
    """A preset's overrides by section, after resolving ``extends:``: the named preset's, then this one's on top.

    ``extends: real.yaml`` (relative to the preset's folder) makes a preset a few lines on top of
    another, so the keys they share live in one file. A missing file, a cycle or a section that
    is not a mapping raises ParamsError naming the preset.
    """
    return _read_preset(Path(preset_path), ())


def _read_preset(path: Path, chain: tuple[Path, ...]) -> dict[str, dict[str, Any]]:
    if path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ParamsError(f"{path}: presets extend each other in a cycle: {names}")
    preset = read_yaml(path)
    parent = preset.pop(PRESET_EXTENDS, None)
    merged: dict[str, dict[str, Any]] = {}
    if parent is not None:
        if not isinstance(parent, str) or not parent.strip():
            raise ParamsError(f"{path}: {PRESET_EXTENDS!r} must name a preset file, e.g. real.yaml")
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ParamsError(f"{path}: {PRESET_EXTENDS}: {parent!r} is not a file next to it ({parent_path})")
        merged = _read_preset(parent_path, (*chain, path.resolve()))
    for section, values in preset.items():
        if section not in SECTIONS:
            raise ParamsError(f"{path}: unknown section {section!r}; known ones are {list(SECTIONS)}")
        if not isinstance(values, dict):
            raise ParamsError(f"{path}: section {section!r} must be a mapping of keys to values")
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def preset_flags(preset_path: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    """``dvc exp run`` flags (``["-S", "train.epochs=28", ...]``) for a preset file of params overrides.

    The preset is a params-style mapping holding only what differs from ``params_path`` (or from
    the preset it ``extends:``); it is merged over that file and validated like it (an unknown
    section or key, or a bad value, raises ParamsError naming the preset), so a typo in a preset
    never reaches a long run.
    """
    preset = read_preset(preset_path)
    base = read_params(params_path)
    flags: list[str] = []
    for section, values in preset.items():
        try:
            from_dict(SECTIONS[section], section, {**(base.get(section) or {}), **values})
        except ParamsError as exc:
            raise ParamsError(f"{preset_path}: {exc}") from None
        flags += [item for key, value in values.items() for item in ("-S", f"{section}.{key}={_flag_value(value)}")]
    return flags
