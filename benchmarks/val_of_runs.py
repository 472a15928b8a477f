"""Score finished full-length runs on val with intervals, and each against the preset, paired.

    PYTHONPATH=src python benchmarks/val_of_runs.py --prepared data/prepared --out DIR \\
        preset=PATH/model.pt lung_crop=PATH/model.pt [NAME=PATH/model.pt ...]

Each ``NAME=MODEL`` is a model file that a full run wrote (e.g. ``dvc exp run`` of the preset
with one lever added; ``dvc exp show`` / the experiment's ``dvc.lock`` finds it in the cache).
One of them must be called ``preset``: it is the baseline of the paired differences. Every model
is scored on the **val** split of ``--prepared`` the way its file says it is used (lung gate,
flips, temperature, val-tuned threshold), exactly as ``screen_levers.py`` scores its proxy runs,
so the two tables read the same way. Writes ``OUT/NAME/val_per_image.csv`` and ``OUT/val.json`` +
``OUT/val.md``. Test is never read here: a run is chosen on val.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from screen_levers import BASELINE, paired_cell, summarise, val_table  # noqa: E402

from covidseg.atomic import write_json, write_text  # noqa: E402
from covidseg.evaluation.compare import compare  # noqa: E402
from covidseg.model.checkpoint import load_model  # noqa: E402


def parse_runs(items: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` items -> {name: path}; the baseline must be among them and every file must exist."""
    runs: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{item!r}: expected NAME=PATH/model.pt")
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such model file (run {name!r})")
        runs[name] = Path(path)
    if BASELINE not in runs:
        raise SystemExit(f"one run must be called {BASELINE!r}: the baseline of the paired differences")
    return runs


def markdown(rows: dict, runs: dict[str, dict]) -> str:
    lines = [
        "Full-length runs scored on val: per-image Dice at each model's tuned threshold, 95 % bootstrap "
        "intervals (1000 resamples, seed 0); paired = run minus the preset over the same images.",
        "",
        "| run | val Dice | minus preset (paired) | verdict | val RMSE | per-image RMSE minus preset (paired) "
        "| epochs kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        diff, rmse = row.get("minus_preset"), row.get("rmse_minus_preset")
        lo, hi = row["val_dice_ci95"]
        lines.append(
            f"| {name} | {row['val_dice']:.3f} [{lo:.3f}, {hi:.3f}] | {paired_cell(diff)} | "
            f"{diff['verdict'] if diff else '–'} | {row['val_rmse']:.4f} | {paired_cell(rmse, 4)} | "
            f"{runs[name]['kept']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path, required=True, help="the preprocess stage's output folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("runs", nargs="+", help="NAME=PATH/model.pt, one called 'preset'")
    args = ap.parse_args()
    runs = parse_runs(args.runs)
    facts = {}
    for name, path in runs.items():
        print(f"== {name}: {path}", flush=True)
        val_table(path, args.prepared).to_csv(_mkdir(args.out / name) / "val_per_image.csv", index=False)
        meta = load_model(path)[1]
        facts[name] = {
            "model": str(path),
            "model_md5": hashlib.md5(path.read_bytes()).hexdigest(),  # as the run's dvc.lock records it
            "train_params": meta.get("train_params"),
            "kept": meta.get("snapshot_epochs") or meta.get("best_epoch"),
        }
    names = [BASELINE, *(n for n in runs if n != BASELINE)]
    rows = summarise(args.out, names)
    # per-image RMSE too (compare knows lower is better for it), from the written tables as summarise's
    # Dice is, so every number in val.json can be re-derived from the committed CSVs
    base = pd.read_csv(args.out / BASELINE / "val_per_image.csv")
    for name in names[1:]:
        c = compare(pd.read_csv(args.out / name / "val_per_image.csv"), base, "rmse")
        rows[name]["rmse_minus_preset"] = {"diff": c.diff, "ci95": [c.low, c.high], "verdict": c.verdict}
    machine = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json(args.out / "val.json", {"machine": machine, "runs": facts, "val": rows})
    write_text(args.out / "val.md", markdown(rows, facts))
    print(yaml.safe_dump(rows, sort_keys=False), flush=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    main()
