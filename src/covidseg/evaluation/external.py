"""External validation in one command (``covidseg evaluate MODEL SOURCE --out DIR``): any trained model, or another
tool's predicted masks, scored on any labelled source with every test metric of the pipeline and its intervals.

MODEL is a ``model.pt`` (torch, as the evaluate stage runs it), a ``model.onnx`` (onnxruntime, its calibration
inside), or a folder of predicted masks, e.g. nnU-Net's: ``<case>.png`` per film, 0/1 or 0/255, named by the
case ids of :func:`covidseg.data.layout.case_ids` (what ``covidseg export-nnunet`` wrote). SOURCE is a Kaggle
folder or zip, a manifest (a CSV or MONAI datalist, or the folder holding one: :mod:`covidseg.data.manifest`;
without a split column every film it lists is scored), or an extract stage folder (``manifest.csv``,
``subset.zip``); only the split scored (``split``, default ``test``) needs COVID-19 films. Films are prepared exactly as the pipeline prepares them
(extract, then resize to the model's input size with its contrast normalisation); a mask folder is scored
at the films' own size (as nnU-Net predicted them).

DIR gets what the evaluate stage writes: ``metrics.json`` (headline), ``details.json`` (everything, with
intervals and severity against the true lung masks), ``per_image.csv`` (one row per film, keyed by ``id``:
``covidseg compare`` pairs two such tables), ``curves/``, ``predictions.npz`` and ``figures/``, the
report's figures for these films (all but the two training curves: there is no training run here). The baselines' prevalence
and median share come from the source's train split; a source without one (an external test set) uses the
scored films' own, which flatters the baselines, and the summary says so (``baseline_source``).
Severity for a mask folder uses the true lungs (the masks hold infection only).
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from covidseg.atomic import write_json
from covidseg.data.arrays import load_split
from covidseg.data.extract import extract
from covidseg.data.layout import case_ids, is_extract_output
from covidseg.data.preprocess import preprocess
from covidseg.evaluation.evaluate import score, torch_predictions
from covidseg.evaluation.figures import make_figures
from covidseg.params import DataParams, EvaluateParams, PlotsParams, PreprocessParams

SPLITS = ("train", "val", "test")


class ExternalEvaluationError(ValueError):
    """The model or the source cannot be evaluated (the message names the file)."""


def evaluate_external(
    model: str | Path,
    source: str | Path,
    out: str | Path,
    split: str = "test",
    data: DataParams | None = None,
    params: EvaluateParams | None = None,
) -> dict:
    """Score ``model`` on ``split`` of ``source``; write the outputs under ``out`` (see the module doc).

    Returns the summary (``details.json``) with ``model``, ``source``, ``split`` and ``baseline_source`` added.
    """
    model, source, out = Path(model), Path(source), Path(out)
    params = params or EvaluateParams()
    if split not in SPLITS:
        raise ExternalEvaluationError(f"split {split!r}: choose one of {list(SPLITS)}")
    if not model.exists():
        raise ExternalEvaluationError(f"{model}: no such model file or mask folder")
    predictor = _predictor(model)
    with tempfile.TemporaryDirectory() as tmp:
        extracted = source if is_extract_output(source) else Path(tmp) / "extracted"
        if extracted != source:
            given = data or DataParams()
            extract(
                source,
                extracted,
                Path(tmp) / "data.json",
                dataclasses.replace(given, source=str(source)),
                required_splits=(split,),
                unsplit=split,
            )
        size, contrast = predictor.size_for(extracted), predictor.contrast
        preprocess(extracted, Path(tmp) / "prepared", PreprocessParams(image_size=size, contrast=contrast))
        test = load_split(Path(tmp) / "prepared", split)
        if len(test["images"]) == 0:
            raise ExternalEvaluationError(f"{source}: the {split} split holds no films")
        train = load_split(Path(tmp) / "prepared", "train")
        own = len(train["masks"]) == 0
        baseline = test if own else train
        prob, lung_prob, run = predictor.predict(test, extracted, split)
        outputs = (
            out / "metrics.json",
            out / "per_image.csv",
            out / "curves",
            out / "predictions.npz",
            out / "details.json",
        )
        masks = (baseline["masks"][:, 0].astype(bool), baseline["lungs"][:, 0].astype(bool))
        summary = score(prob, lung_prob, test, masks, run, outputs, params, name=source)
        scored = Path(tmp) / "scored"  # the figures read the scored split as "test"
        scored.mkdir()
        (scored / "test.npz").symlink_to(Path(tmp) / "prepared" / f"{split}.npz")
        make_figures(
            scored,
            out / "predictions.npz",
            None,
            out / "curves",
            out / "per_image.csv",
            out / "figures",
            PlotsParams(),
            metrics_json=out / "details.json",
        )
    summary |= {
        "model": str(model),
        "source": str(source),
        "split": split,
        "baseline_source": "the scored films themselves (the source has no train split)" if own else "train split",
    }
    write_json(out / "details.json", summary)
    return summary


class _Predictor:
    """Probabilities for a prepared split: ``size_for`` (the input size), ``contrast`` and ``predict``."""

    contrast = "none"

    def size_for(self, extracted: Path) -> int:
        raise NotImplementedError

    def predict(self, test: dict, extracted: Path, split: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
        raise NotImplementedError


def _predictor(model: Path) -> _Predictor:
    if model.is_dir():
        return _MaskFolder(model)
    from covidseg.inference.backends import model_backend

    return _Onnx(model) if model_backend(model) == "onnx" else _Torch(model)


class _Torch(_Predictor):
    def __init__(self, path: Path):
        from covidseg.model.checkpoint import load_model

        self.path = path
        try:
            self.model, self.meta = load_model(path)
        except Exception as exc:  # a file that is not a covidseg checkpoint
            raise ExternalEvaluationError(f"{path}: not a covidseg model file ({exc})") from None
        self.contrast = str(self.meta.get("contrast", "none"))

    def size_for(self, extracted: Path) -> int:
        return int(self.meta.get("size", 256))

    def predict(self, test, extracted, split):
        from covidseg.device import choose_device

        device = choose_device("auto")
        return torch_predictions(self.model.to(device), self.meta, test["images"], device, "fp32")


class _Onnx(_Predictor):
    def __init__(self, path: Path):
        from covidseg.inference.onnx_runtime import OnnxModelError, OnnxPredictor

        try:
            self.predictor = OnnxPredictor(path)
        except OnnxModelError as exc:
            raise ExternalEvaluationError(str(exc)) from None
        self.contrast = self.predictor.contrast

    def size_for(self, extracted: Path) -> int:
        return self.predictor.size

    def predict(self, test, extracted, split):
        prob, logits = self.predictor.run(test["images"], normalised=True)
        lung = 1.0 / (1.0 + np.exp(-logits[:, 1].astype(np.float64))) if logits.shape[1] > 1 else None
        c = self.predictor.calibration
        run = {
            "threshold": c["threshold"],
            "temperature": c["temperature"],
            "flip_tta": c["flip_tta"],
            "lung_gate": c["lung_gate"],
            "evaluate_precision": "fp32 (onnxruntime)",
            "train_precision": "unknown",
            "share_interval": self.predictor.share_interval,
        }
        return prob, None if lung is None else lung.astype(np.float32), run


class _MaskFolder(_Predictor):
    """Another tool's binary masks: probability 1 inside, 0 outside (so RMSE is the masks' own)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def size_for(self, extracted: Path) -> int:
        with open(extracted / "manifest.csv", newline="", encoding="utf-8") as f:
            sizes = {(int(r["height"]), int(r["width"])) for r in csv.DictReader(f)}
        if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
            raise ExternalEvaluationError(
                f"{extracted / 'manifest.csv'}: a mask folder is scored at the films' own size, which must be one "
                f"square size; these films have {sorted(sizes)[:4]}"
            )
        return next(iter(sizes))[0]

    def predict(self, test, extracted, split):
        with open(extracted / "manifest.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        cases = dict(zip(((r["split"], r["class"], r["id"]) for r in rows), case_ids(rows)))
        size = test["images"].shape[-1]
        probs = np.zeros((len(test["ids"]), size, size), np.float32)
        for k, (film, cls) in enumerate(zip(test["ids"], test["classes"])):
            path = self.folder / f"{cases[(split, str(cls), str(film))]}.png"
            if not path.is_file():
                raise ExternalEvaluationError(f"{path}: no predicted mask for film {film} (named by its case id)")
            mask = np.asarray(Image.open(path).convert("L"))
            if mask.shape != (size, size):
                raise ExternalEvaluationError(f"{path}: mask {mask.shape}, but the film is {size}x{size}")
            values = set(np.unique(mask).tolist())
            if not values <= {0, 1, 255}:
                raise ExternalEvaluationError(f"{path}: a mask holds 0/1 or 0/255, not {sorted(values)[:5]}")
            probs[k] = mask > 0
        run = {
            "threshold": 0.5,
            "temperature": 1.0,
            "flip_tta": False,
            "lung_gate": False,
            "evaluate_precision": "masks",
            "train_precision": "unknown",
        }
        return probs, None, run
