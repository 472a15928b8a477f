"""DVC stage train: data/prepared -> models/model.pt, models/train_log.json, plots/train/curves.tsv, metrics/train.json.

Runs alone (`python stages/train.py`) or under `torchrun --nproc-per-node=N stages/train.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402

from covidseg import logs  # noqa: E402
from covidseg.params import TrainParams, load_section, load_seed  # noqa: E402
from covidseg.training.run import train  # noqa: E402


def main(
    prepared: str = "data/prepared",
    model: str = "models/model.pt",
    resume: str = "models/resume",
    curves: str = "plots/train/curves.tsv",
    metrics: str = "metrics/train.json",
    params: str = "params.yaml",
    train_log: str = "models/train_log.json",
) -> None:
    logs.configure(logs.stage_verbosity())  # COVIDSEG_LOG=quiet|normal|verbose; ranks other than 0 log errors only
    summary = train(
        prepared,
        model,
        resume,
        curves,
        metrics,
        load_section(TrainParams, "train", params),
        load_seed(params),
        log_path=train_log,
    )
    typer.echo(
        f"train: best epoch {summary['best_epoch']} (by val_dice@0.5 {summary['val_dice_at_0.5']:.4f}), "
        f"val Dice {summary['val_dice_at_threshold']:.4f} at the tuned threshold {summary['threshold']}, "
        f"{summary['train_images']} training images, {summary['train_images_per_second']:.1f} img/s ({summary['precision']})"
    )


if __name__ == "__main__":
    typer.run(main)
