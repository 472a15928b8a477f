"""DVC stage card: params.yaml, models/model.pt and the metrics -> models/MODEL_CARD.md (never edited by hand)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402

from covidseg.evaluation.model_card import write_card  # noqa: E402


def main(
    params: str = "params.yaml",
    model: str = "models/model.pt",
    test_metrics: str = "metrics/test.json",
    test_details: str = "metrics/test_details.json",
    train_metrics: str = "metrics/train.json",
    per_image: str = "plots/eval/per_image.csv",
    export_metrics: str = "metrics/export.json",
    out: str = "models/MODEL_CARD.md",
) -> None:
    write_card(params, model, test_metrics, test_details, train_metrics, per_image, out, export_json=export_metrics)
    typer.echo(f"card: wrote {out}")


if __name__ == "__main__":
    typer.run(main)
