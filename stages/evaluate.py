"""DVC stage evaluate: models/model.pt + data/prepared/test.npz -> metrics/test.json (headline),
metrics/test_details.json (everything), plots/eval/*, predictions."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402

from covidseg.evaluation.evaluate import evaluate  # noqa: E402
from covidseg.params import EvaluateParams, load_section  # noqa: E402


def main(
    model: str = "models/model.pt",
    prepared: str = "data/prepared",
    metrics: str = "metrics/test.json",
    details: str = "",
    per_image: str = "plots/eval/per_image.csv",
    curves: str = "plots/eval",
    predictions: str = "data/predictions/test.npz",
    params: str = "params.yaml",
) -> None:
    s = evaluate(
        model,
        prepared,
        metrics,
        per_image,
        curves,
        predictions,
        load_section(EvaluateParams, "evaluate", params),
        details_path=details or None,
    )  # default: <metrics stem>_details.json beside it
    typer.echo(
        f"evaluate: test RMSE {s['rmse']:.4f}, Dice {s['dice']:.4f}, IoU {s['iou']:.4f} (threshold 0.5); "
        f"Dice {s['at_tuned_threshold']['dice_mean']:.4f} at tuned {s['at_tuned_threshold']['threshold']}"
    )


if __name__ == "__main__":
    typer.run(main)
