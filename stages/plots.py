"""DVC stage plots: predictions, curves and evaluation tables -> plots/figures/*.png and plots/report.html."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402

from covidseg.evaluation.figures import make_figures  # noqa: E402
from covidseg.evaluation.report import write_report  # noqa: E402
from covidseg.params import DataParams, PlotsParams, load_section  # noqa: E402


def main(
    prepared: str = "data/prepared",
    predictions: str = "data/predictions/test.npz",
    curves: str = "plots/train/curves.tsv",
    eval_dir: str = "plots/eval",
    per_image: str = "plots/eval/per_image.csv",
    test_metrics: str = "metrics/test_details.json",
    train_metrics: str = "metrics/train.json",
    data_metrics: str = "metrics/data_details.json",
    out: str = "plots/figures",
    report: str = "plots/report.html",
    params: str = "params.yaml",
) -> None:
    written = make_figures(
        prepared,
        predictions,
        curves,
        eval_dir,
        per_image,
        out,
        load_section(PlotsParams, "plots", params),
        metrics_json=test_metrics,
    )
    source = load_section(DataParams, "data", params).source
    write_report(test_metrics, train_metrics, data_metrics, written, report, source=source)
    typer.echo(f"plots: wrote {len(written)} figures to {out} and the report to {report}")


if __name__ == "__main__":
    typer.run(main)
