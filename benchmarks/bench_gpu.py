"""Train and evaluate presets straight from the library (no DVC), e.g. on a lent GPU machine.

    PYTHONPATH=src python benchmarks/bench_gpu.py --extracted DIR --out DIR [--preset presets/real.yaml ...]

``DIR`` of ``--extracted`` is what the pipeline's extract stage writes (``subset.zip``,
``source.json``, ...; a few tens of MB for the COVID-19 subset, so it can travel). For each preset:
preprocess once, train with the preset's ``train.*`` merged over params.yaml (device auto: the
GPU when there is one), evaluate on the test split, and record images/s, wall time, val Dice and
the test headline (segmentation and severity) in ``OUT/gpu.json``. ``--minutes`` caps each
training run (stopped after the epoch that crosses it, recorded as such), so one command fits a
lease.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from covidseg.atomic import write_json  # noqa: E402
from covidseg.data.preprocess import preprocess  # noqa: E402
from covidseg.evaluation.evaluate import evaluate  # noqa: E402
from covidseg.params import EvaluateParams, PreprocessParams, TrainParams, from_dict, read_params, read_preset  # noqa: E402
from covidseg.training.run import train  # noqa: E402


def preset_params(preset: Path) -> TrainParams:
    """params.yaml's train section with the preset's train section over it (validated)."""
    base = read_params(REPO / "params.yaml")["train"]
    return from_dict(TrainParams, "train", {**base, **read_preset(preset).get("train", {})})


def run_preset(preset: Path, prepared: Path, out: Path, minutes: float, seed: int) -> dict:
    params = preset_params(preset)
    run = out / preset.stem
    deadline = time.monotonic() + 60 * minutes
    stopped = {}

    def budget(trainer, row) -> bool:
        if time.monotonic() > deadline and row["epoch"] < params.epochs:
            stopped["epoch"] = row["epoch"]
            return False
        return True

    start = time.perf_counter()
    summary = train(
        prepared,
        run / "model.pt",
        run / "resume",
        run / "curves.tsv",
        run / "train.json",
        params,
        seed,
        on_epoch_end=budget,
    )
    train_wall = time.perf_counter() - start
    test = evaluate(
        run / "model.pt", prepared, run / "test.json", run / "per_image.csv", run, run / "pred.npz", EvaluateParams()
    )
    head = json.loads((run / "test.json").read_text())
    return {
        "preset": preset.as_posix(),
        "params": dataclasses.asdict(params),
        "epochs_run": summary["epochs_run"],
        "stopped_by_time_budget_after_epoch": stopped.get("epoch"),
        "train_wall_s": train_wall,
        "train_images_per_second": summary["train_images_per_second"],
        "device": summary["device"],
        "precision": summary["precision"],
        "val_dice_at_threshold": summary["val_dice_at_threshold"],
        "val_dice_at_0.5": summary["val_dice_at_0.5"],
        "test": head,
        "test_by_class": test["by_class"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extracted", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", type=Path, nargs="+", default=[REPO / "presets/real.yaml"])
    ap.add_argument("--minutes", type=float, default=4.0, help="cap on each training run's wall time")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    prepared = args.out / "prepared"
    counts = preprocess(args.extracted, prepared, PreprocessParams(image_size=256))
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads(),
        },
        "split_counts": counts,
        "runs": [],
    }
    for preset in args.preset:
        results["runs"].append(run_preset(preset, prepared, args.out, args.minutes, args.seed))
        write_json(args.out / "gpu.json", results)
        print(json.dumps({k: v for k, v in results["runs"][-1].items() if k != "params"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
