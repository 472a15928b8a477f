"""Build ``models/reference/``: the real preset's model files, its card and ``reference.json``, from a finished
``make real`` checkout and the real data it was trained on.

What the card states, each computed here: the val and dev-Test numbers with their 95 % bootstrap
intervals (segmentation and severity; val through :func:`covidseg.evaluation.evaluate.evaluate` on the
val split), what the model does on the Non-COVID and Normal films it never saw (the share of films
with any pixel marked and the mean marked area, through ``covidseg predict``'s own code path on the
fp32 ONNX), how it was made (command, commit, preset SHA-256, CPU kind, precision) and the licence.
``tests/test_reference_model.py`` holds the shipped files to ``reference.json`` and the preset hash.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from covidseg.atomic import atomic_path, write_json, write_text
from covidseg.data.arrays import load_split
from covidseg.data.layout import find_roots
from covidseg.evaluation.evaluate import evaluate
from covidseg.export.int8 import Int8Mismatch, compare, quantize
from covidseg.inference.backends import LoadedModel
from covidseg.inference.predict import PredictOptions, load_model_for_predict, predict_files
from covidseg.inference.reference import CARD, FP32_ONNX, INT8_ONNX, RECORD, TORCH_FILE
from covidseg.params import NEGATIVE_CLASSES, EvaluateParams, ExportParams, load_section

LICENCE = (
    "The weights are derived from COVID-QU-Ex (Tahir et al., Computers in Biology and Medicine 139:105002, 2021; "
    "Kaggle `anasmohammedtahir/covidqu`), licensed CC BY-SA 4.0. We treat the weights as an adaptation of that data "
    "and license them CC BY-SA 4.0 too: credit the dataset and share adaptations under the same licence. "
    "The code stays MIT."
)
SPLIT_DIRS = ("Train", "Val", "Test")


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_description() -> str:
    """The CPU's model name and whether it has native bf16 (from /proc/cpuinfo where there is one)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    kind = (
        "native bf16 (avx512_bf16)" if "avx512_bf16" in flags else ("AVX2, no native bf16" if "avx2" in flags else "")
    )
    return f"{name}{', ' + kind if kind else ''}"


def val_evaluation(model_pt: Path, prepared_dir: Path, params: EvaluateParams, work: Path) -> dict:
    """Every test metric of evaluate(), computed on the val split: ``prepared_dir/val.npz`` taken as the test split.

    Returns evaluate()'s summary. Val chose the epoch, the threshold and the temperature, so its
    numbers are optimistic; the dev-Test numbers are the honest ones.
    """
    as_test = work / "val_as_test"
    as_test.mkdir(parents=True)
    (as_test / "test.npz").symlink_to((prepared_dir / "val.npz").resolve())
    (as_test / "train.npz").symlink_to((prepared_dir / "train.npz").resolve())
    out = work / "val_eval"
    return evaluate(
        model_pt,
        as_test,
        out / "val.json",
        out / "per_image.csv",
        out / "curves",
        out / "predictions.npz",
        params,
    )


@dataclass(frozen=True)
class NegativeFilms:
    """The model on films with no infection: ``films``, ``marked`` (films with any pixel marked),
    ``mean_area_pct`` / ``median_area_pct`` (marked pixels, percent of the film, over all films)."""

    films: int
    marked: int
    mean_area_pct: float
    median_area_pct: float

    @property
    def marked_share(self) -> float:
        return self.marked / self.films if self.films else float("nan")


def split_root(data_root: Path) -> Path:
    """The one folder under ``data_root`` (a Kaggle-layout tree) that holds Train/Val/Test; ValueError otherwise."""
    data_root = Path(data_root)
    dirs = {p.relative_to(data_root).as_posix() for p in data_root.rglob("*") if p.is_dir()}
    roots = find_roots(dirs)
    if len(roots) != 1:
        raise ValueError(f"{data_root}: expected one Train/Val/Test root of the Kaggle layout, found {roots or 'none'}")
    return data_root / roots[0]


def negative_behaviour(loaded: LoadedModel, data_root: Path, work: Path) -> dict[str, NegativeFilms]:
    """``covidseg predict`` with ``loaded`` (the fp32 ONNX, its threshold) on every Non-COVID and Normal dev film."""
    root = split_root(data_root)
    out = {}
    for cls in NEGATIVE_CLASSES:
        paths = sorted(p for split in SPLIT_DIRS for p in (root / split / cls / "images").glob("*.png"))
        if not paths:
            raise FileNotFoundError(f"{root}: no {cls} films under {{Train,Val,Test}}/{cls}/images")
        rows = predict_files(paths, work / f"predict_{cls}", loaded, PredictOptions())
        failed = [r for r in rows if r.status != "ok"]
        if failed:
            raise RuntimeError(f"{failed[0].input}: {failed[0].error}")
        areas = [100.0 * r.infected_fraction for r in rows]
        out[cls] = NegativeFilms(
            films=len(rows),
            marked=sum(a > 0 for a in areas),
            mean_area_pct=statistics.fmean(areas),
            median_area_pct=statistics.median(areas),
        )
    return out


def _ci(block: dict, key: str, digits: int) -> str:
    low, high = block.get(f"{key}_ci95_low"), block.get(f"{key}_ci95_high")
    return f"{block[key]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _rows(summary: dict) -> list[tuple[str, str]]:
    """(what, value [95 % interval]) for one split's summary."""
    sev = summary["severity"]["model"]
    iv = summary["intervals"]
    return [
        ("per-image Dice at 0.5", _ci({**iv, "dice": summary["dice"]}, "dice", 3)),
        ("per-image IoU at 0.5", _ci({**iv, "iou": summary["iou"]}, "iou", 3)),
        ("pixel RMSE (calibrated)", _ci({**iv, "rmse": summary["rmse"]}, "rmse", 4)),
        ("per-image Dice at the tuned threshold", f"{summary['at_tuned_threshold']['dice_mean']:.3f}"),
        ("lung Dice", _ci(sev, "lung_dice", 3)),
        ("per-lung infected share, MAE (points)", _ci(sev, "share_mae", 1)),
        ("extent score 0-8, quadratic-weighted kappa", _ci(sev, "extent_kappa", 3)),
        ("extent score exact / within 1", f"{sev['extent_exact']:.3f} / {sev['extent_within1']:.3f}"),
    ]


def _int8_lines(int8: dict) -> list[str]:
    if not int8.get("file"):
        return [f"No int8 model is shipped: {int8.get('refused', 'not built')}."]
    d, e = int8["dice"], int8.get("share_error")
    lines = [
        f"`{INT8_ONNX}`: BatchNorm folded, convolutions int8 (weights per channel"
        + (", 7 bits" if int8.get("reduce_range") else "")
        + f", activations between them uint8, calibrated on {int8['calibration_images']} val films); the "
        "convolutions reading the grey input and writing the logits, and the calibration ops, fp32. "
        f"Against the fp32 file on the {int8['images']} dev-Test films (int8 minus fp32, paired 95 % interval; it "
        "ties when the difference is at most the half-width of fp32's own interval):",
        "",
        f"- per-image Dice {d['fp32']:.4f} -> {d['int8']:.4f}: {d['difference']:+.4f} "
        f"[{d['difference_ci95'][0]:+.4f}, {d['difference_ci95'][1]:+.4f}], half-width {d['margin']:.4f}",
    ]
    if e:
        lines.append(
            f"- per-lung share error {e['fp32']:.2f} -> {e['int8']:.2f} points: {e['difference']:+.2f} "
            f"[{e['difference_ci95'][0]:+.2f}, {e['difference_ci95'][1]:+.2f}], half-width {e['margin']:.2f}"
        )
    if any(lo > 0 or hi < 0 for lo, hi in (b["difference_ci95"] for b in (d, e) if b)):
        lines += [
            "",
            "Where a paired interval excludes 0, int8 is slightly but consistently off fp32: within the metrics' own "
            "uncertainty, not identical. `covidseg predict` uses the fp32 file unless `--model` names the int8 one.",
        ]
    return lines


def card_text(record: dict, val: dict, test: dict, negatives: dict[str, NegativeFilms]) -> str:
    """The reference model's MODEL_CARD.md."""
    lines = [
        "# Model card: the covidseg reference model",
        "",
        "Built by `tools/make_reference.py` from a `make real` run; every number below was computed by it. "
        f"Files: `{FP32_ONNX}` (fp32 ONNX, calibration inside: what `covidseg predict` uses when `--model` is omitted)"
        + (f", `{TORCH_FILE}` (torch)" if record["files"].get(TORCH_FILE) else "")
        + (f", `{INT8_ONNX}` (int8 ONNX, ties with fp32 on dev-Test: see below)" if record["int8"].get("file") else "")
        + ". SHA-256 of each in `reference.json`.",
        "",
        "**Research use only. Not a medical device**: not for diagnosis, triage or any decision about a patient.",
        "",
        "## Licence",
        "",
        LICENCE,
        "",
        "## Training data",
        "",
        f"COVID-QU-Ex, `Infection Segmentation Data`, COVID-19 films only: a deterministic re-split of the "
        f"official Train split into {record['split_counts']['train']} train / {record['split_counts']['val']} val / "
        f"{record['split_counts']['test']} dev-Test films (256 x 256, 8-bit grey). The official Val and Test "
        "splits were not used; numbers on them will differ.",
        "",
        "## How it was made",
        "",
        f"- Command: `{record['command']}`",
        f"- Commit: `{record['commit']}`",
        f"- Preset: `{record['preset']}`, SHA-256 `{record['preset_sha256']}` (a test fails when the preset changes "
        "and this no longer matches: retrain then)",
        f"- Trained on: {record['cpu']}, {record['world_size']} process(es), precision {record['train_precision']}, "
        f"{record['train_minutes']:.1f} minutes of training ({record['train_images_per_second']:.1f} img/s)",
        f"- Best epoch {record['best_epoch']} of {record['epochs_run']} (by val Dice at 0.5); calibration chosen on val: "
        f"threshold {record['threshold']}, temperature {record['temperature']}, lung gate "
        f"{'on' if record['lung_gate'] else 'off'}, flip averaging {'on' if record['flip_tta'] else 'off'}",
        "",
        "## Quality (95 % percentile-bootstrap intervals over films, 1000 resamples)",
        "",
        f"Val ({val['n_images']} films) chose the epoch and the calibration, so it is optimistic; dev-Test "
        f"({test['n_images']} films) chose nothing. Computed in fp32.",
        "",
        "| metric | val | dev-Test |",
        "|---|---|---|",
    ]
    for (what, v), (_, t) in zip(_rows(val), _rows(test)):
        lines.append(f"| {what} | {v} | {t} |")
    lines += [
        "",
        "## On films without COVID-19 (never seen in training)",
        "",
        "All Non-COVID and Normal films of the dev data (its Train, Val and Test folders; the model was "
        "trained on COVID-19 films only), through `covidseg predict` with this model's threshold:",
        "",
        "| class | films | films with any pixel marked | mean marked area (% of film) | median |",
        "|---|---|---|---|---|",
    ]
    for cls, n in negatives.items():
        lines.append(
            f"| {cls} | {n.films} | {n.marked} ({100 * n.marked_share:.0f} %) | {n.mean_area_pct:.2f} | "
            f"{n.median_area_pct:.2f} |"
        )
    lines += [
        "",
        "The model does not tell a COVID-19 film from another: run it on films already known to be COVID-19.",
        "",
        "## int8",
        "",
        *_int8_lines(record["int8"]),
        "",
        "## Input contract",
        "",
        f"- One frontal (PA/AP) chest X-ray, any size and mode; resized to {record['size']} x {record['size']} pixels.",
        "- Image left = the patient's right lung, as radiographs are read.",
        "",
    ]
    return "\n".join(lines)


def _int8(out_dir: Path, run_dir: Path, params_path: Path, keep_on_mismatch: bool = False) -> dict:
    """Quantise the shipped fp32 ONNX on the run's val films and keep ``model-int8.onnx`` if it ties on dev-Test.

    On a mismatch the file is removed and the record says why; with ``keep_on_mismatch`` the file that was
    there stays and Int8Mismatch is raised instead."""
    prepared = run_dir / "data" / "prepared"
    params = load_section(ExportParams, "export", params_path)
    n = params.int8_calibration_images
    test = load_split(prepared, "test")
    target = out_dir / INT8_ONNX
    try:
        with atomic_path(target) as tmp:
            quantize(
                out_dir / FP32_ONNX,
                tmp,
                load_split(prepared, "val")["images"][:n],
                reduce_range=params.int8_reduce_range,
            )
            result = compare(
                out_dir / FP32_ONNX,
                tmp,
                test["images"],
                test["masks"][:, 0].astype(bool),
                test["lungs"][:, 0].astype(bool),
                name=target,
            )
    except Int8Mismatch as exc:
        if keep_on_mismatch:
            raise
        target.unlink(missing_ok=True)
        return {"file": None, "refused": str(exc)}
    return {"file": INT8_ONNX, "calibration_images": n, "reduce_range": params.int8_reduce_range, **result}


def refresh_int8(out_dir: Path, run_dir: Path) -> dict:
    """Rebuild only ``model-int8.onnx`` in ``out_dir`` (after a change to :mod:`covidseg.export.int8`) from the
    shipped fp32 file and ``run_dir``'s prepared val and dev-Test films (the same split as the training run:
    ``dvc repro preprocess`` on the same data and params); update reference.json's int8 record and hash and the
    card's int8 section. The fp32 files and every other number stay as they are. Returns the int8 record;
    raises Int8Mismatch (the shipped int8 file left as it was) when the new one does not tie."""
    record = json.loads((out_dir / RECORD).read_text(encoding="utf-8"))
    card = (out_dir / CARD).read_text(encoding="utf-8")
    if "\n## int8\n" not in card:
        raise ValueError(f"{out_dir / CARD}: no '## int8' section to replace; rebuild the whole card instead")
    int8 = _int8(out_dir, run_dir, params_path=run_dir / "params.yaml", keep_on_mismatch=True)
    record["int8"] = int8
    record["files"].pop(INT8_ONNX, None)
    if int8.get("file"):
        record["files"][INT8_ONNX] = sha256(out_dir / INT8_ONNX)
    head, rest = card.split("\n## int8\n", 1)
    tail = rest[rest.index("\n## ") :] if "\n## " in rest else "\n"
    write_text(out_dir / CARD, head + "\n## int8\n\n" + "\n".join(_int8_lines(int8)) + "\n" + tail)
    write_json(out_dir / RECORD, record)
    return int8


def build_reference(
    run_dir: Path,
    data_root: Path,
    out_dir: Path,
    preset: Path,
    command: str,
    commit: str,
    preset_name: str | None = None,
) -> dict:
    """Copy the run's model files into ``out_dir``, compute the card's numbers, write MODEL_CARD.md and reference.json.

    ``run_dir``: the checkout ``make real`` ran in (models/, metrics/, data/prepared/, params.yaml, models/train_log.json).
    The int8 model (:mod:`covidseg.export.int8`, calibrated on the run's val films) is shipped beside the fp32
    one when it ties with it on the dev-Test films; the record says which, with the paired differences.
    ``preset_name``: how the card names the preset (e.g. ``presets/real.yaml``; default: ``preset`` as given).
    Returns the record written to reference.json.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    test = json.loads((run_dir / "metrics" / "test_details.json").read_text(encoding="utf-8"))
    train = json.loads((run_dir / "metrics" / "train.json").read_text(encoding="utf-8"))
    run_log = json.loads((run_dir / "models" / "train_log.json").read_text(encoding="utf-8"))
    counts = json.loads((run_dir / "metrics" / "data.json").read_text(encoding="utf-8"))
    params = load_section(EvaluateParams, "evaluate", run_dir / "params.yaml")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in (FP32_ONNX, TORCH_FILE):
        shutil.copyfile(run_dir / "models" / name, out_dir / name)
        files[name] = sha256(out_dir / name)
    int8 = _int8(out_dir, run_dir, params_path=run_dir / "params.yaml")
    if int8.get("file"):
        files[INT8_ONNX] = sha256(out_dir / INT8_ONNX)
    loaded = load_model_for_predict(out_dir / FP32_ONNX, PredictOptions())
    with tempfile.TemporaryDirectory() as tmp:
        val = val_evaluation(out_dir / TORCH_FILE, run_dir / "data" / "prepared", params, Path(tmp))
        negatives = negative_behaviour(loaded, data_root, Path(tmp))
    record = {
        "command": command,
        "commit": commit,
        "preset": preset_name or Path(preset).as_posix(),
        "preset_sha256": sha256(preset),
        "cpu": cpu_description(),
        "world_size": run_log.get("world_size", 1),
        "train_precision": run_log["precision"],
        "train_minutes": run_log["train_seconds"] / 60,
        "train_images_per_second": run_log["train_images_per_second"],
        "split_counts": {k: counts[f"{k}_images"] for k in ("train", "val", "test")},
        "size": loaded.size,
        **{k: train[k] for k in ("best_epoch", "epochs_run", "threshold", "temperature", "lung_gate", "flip_tta")},
        "val": {k: val[k] for k in ("n_images", "rmse", "dice", "iou")} | {"intervals": val["intervals"]},
        "test": {k: test[k] for k in ("n_images", "rmse", "dice", "iou")} | {"intervals": test["intervals"]},
        "val_severity": val["severity"]["model"],
        "test_severity": test["severity"]["model"],
        "negatives": {cls: {**n.__dict__, "marked_share": n.marked_share} for cls, n in negatives.items()},
        "files": files,
        "int8": int8,
        "licence": "CC-BY-SA-4.0",
    }
    write_text(out_dir / CARD, card_text(record, val, test, negatives))
    write_json(out_dir / RECORD, record)
    return record
