"""Give the shipped reference model its per-lung share interval (:mod:`covidseg.masks.share_interval`) without
retraining: fitted on the run's val films as training now does, written into ``model.pt`` and the ONNX files'
metadata (the weights and graphs stay byte for byte), and scored on the dev-Test films for the card."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnx
import torch

from covidseg.atomic import atomic_path, write_json, write_text
from covidseg.data.arrays import load_split, lung_flags
from covidseg.evaluation.evaluate import evaluate
from covidseg.evaluation.severity_context import anchor_rows, band_rows, interval_sentence
from covidseg.export.reference_card import sha256
from covidseg.inference.calibration import Calibration, calibrated_outputs
from covidseg.inference.reference import CARD, FP32_ONNX, INT8_ONNX, RECORD, TORCH_FILE
from covidseg.masks.share_interval import fit_from_predictions
from covidseg.model.checkpoint import load_model, save_model
from covidseg.params import EvaluateParams, load_section

SECTION = "## Severity intervals"


def _set_onnx_metadata(path: Path, values: dict[str, str]) -> None:
    """Replace or add ``values`` in the metadata_props of the ONNX file at ``path`` (atomically)."""
    model = onnx.load(str(path))
    props = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key not in props:
            props[key] = model.metadata_props.add()
            props[key].key = key
        props[key].value = value
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def refresh_share_interval(out_dir: Path, run_dir: Path) -> dict:
    """Fit the interval on ``run_dir``'s prepared val films (fp32, the model's own calibration), store it in
    ``out_dir``'s model.pt and ONNX files, score it on the dev-Test films, and update reference.json (hashes,
    ``share_interval``) and the card's severity-interval section. Returns the dev-Test interval summary."""
    out_dir, prepared = Path(out_dir), Path(run_dir) / "data" / "prepared"
    net, meta = load_model(out_dir / TORCH_FILE)
    val = load_split(prepared, "val")
    calibration = Calibration.from_meta(meta)
    prob, lung_prob = calibrated_outputs(net, val["images"], torch.device("cpu"), "fp32", calibration)
    truth = (val["masks"][:, 0] > 0, val["lungs"][:, 0] > 0)
    fitted = fit_from_predictions(prob, lung_prob, calibration.threshold, *truth, lung_flags(val))
    if fitted is None:
        raise ValueError(f"{prepared / 'val.npz'}: too few val lungs to fit a share interval")
    save_model(out_dir / TORCH_FILE, net, {**meta, "share_interval": fitted.to_meta()})
    onnx_meta = {
        "covidseg.share_interval": json.dumps(fitted.to_meta(), sort_keys=True),
        "covidseg.source_model_sha256": sha256(out_dir / TORCH_FILE),
    }
    for name in (FP32_ONNX, INT8_ONNX):
        if (out_dir / name).is_file():
            _set_onnx_metadata(out_dir / name, onnx_meta)
    params = load_section(EvaluateParams, "evaluate", Path(run_dir) / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        test = evaluate(out_dir / TORCH_FILE, prepared, t / "m.json", t / "p.csv", t / "c", t / "p.npz", params)
    model_sev = test["severity"]["model"]
    record = json.loads((out_dir / RECORD).read_text(encoding="utf-8"))
    record["share_interval"] = model_sev["share_interval"]
    record["test_share_error_by_true_band"] = model_sev["share_error_by_true_band"]
    for name in list(record["files"]):
        record["files"][name] = sha256(out_dir / name)
    card = (out_dir / CARD).read_text(encoding="utf-8")
    head, _, rest = card.partition(f"\n{SECTION}\n")
    tail = rest[rest.index("\n## ") :] if "\n## " in rest else "\n"
    if not rest:  # first time: the section goes before the int8 one
        head, _, tail = card.partition("\n## int8\n")
        tail = "\n## int8\n" + tail
    lines = [
        "",
        interval_sentence(model_sev).replace("test shares", "dev-Test shares"),
        "",
        "Share error on dev-Test by the lung's true share (the model over-marks lightly infected lungs):",
        "",
        "| true share | lungs | share MAE (points) | bias (points) |",
        "|---|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in band_rows(model_sev)),
        "",
        "Extent agreement on dev-Test beside published anchors (context, not like-for-like targets):",
        "",
        "| who | agreement | scale | source |",
        "|---|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in anchor_rows(model_sev)),
        "",
        "`covidseg predict` writes each lung's interval (`*_infected_pct_low`, `_high`) and a `review` column.",
    ]
    write_text(out_dir / CARD, head + f"\n{SECTION}\n" + "\n".join(lines) + "\n" + tail)
    write_json(out_dir / RECORD, record)
    return model_sev["share_interval"]
