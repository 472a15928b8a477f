"""Build models/reference/ from a finished `make real` checkout (maintainers; rerun whenever presets/real.yaml changes).

    make real DATA=../shared/data/covidqu-dev            # in a clean clone at the commit to record
    .venv/bin/python tools/make_reference.py RUN_CHECKOUT ../shared/data/covidqu-dev

Copies RUN_CHECKOUT/models/model.{onnx,pt} into models/reference/, computes the card's numbers
(val and dev-Test with intervals, the Non-COVID and Normal films) and writes MODEL_CARD.md and
reference.json (covidseg.export.reference_card).

    .venv/bin/python tools/make_reference.py PREPARED_CHECKOUT DATA --int8-only

rebuilds only model-int8.onnx (after a change to covidseg.export.int8) from the shipped fp32 file, on the
val and dev-Test films of a checkout where `dvc repro preprocess` ran on the same data (the same split);
`--interval-only` likewise fits the per-lung share interval on those val films and stores it in the shipped
files (covidseg.export.reference_interval).
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import typer  # noqa: E402

from covidseg import logs  # noqa: E402
from covidseg.export.reference_card import build_reference, refresh_int8  # noqa: E402
from covidseg.export.reference_interval import refresh_share_interval  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(
    run_checkout: Path = typer.Argument(..., help="The checkout `make real` ran in."),
    data: Path = typer.Argument(..., help="The data it was trained on (the Kaggle-layout folder)."),
    out: Path = typer.Option(REPO / "models" / "reference", help="Where the reference files go."),
    preset: Path = typer.Option(Path("presets/real.yaml"), help="The preset the run used (relative to the repo)."),
    command: str = typer.Option("make real DATA=../shared/data/covidqu-dev", help="The exact command that trained it."),
    int8_only: bool = typer.Option(
        False,
        help="Rebuild only model-int8.onnx and its lines (RUN_CHECKOUT needs only data/prepared and params.yaml).",
    ),
    interval_only: bool = typer.Option(
        False,
        help="Fit only the per-lung share interval on val and store it in the shipped files (weights unchanged).",
    ),
) -> None:
    logs.configure(logs.stage_verbosity())
    if interval_only:
        block = refresh_share_interval(out, run_checkout)
        typer.echo(f"reference: share interval q {block['q']:.2f}, dev-Test coverage {block['coverage']:.3f}")
        return
    if int8_only:
        int8 = refresh_int8(out, run_checkout)
        shown = f"Dice {int8['dice']['difference']:+.4f}" if int8.get("file") else int8["refused"]
        typer.echo(f"reference: {out / 'model-int8.onnx'} rebuilt ({shown})")
        return
    commit = subprocess.run(
        ["git", "-C", str(run_checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    record = build_reference(run_checkout, data, out, REPO / preset, command, commit, preset_name=preset.as_posix())
    typer.echo(
        f"reference: {out} (commit {commit[:10]}; dev-Test Dice {record['test']['dice']:.3f}, "
        f"share MAE {record['test_severity']['share_mae']:.1f})"
    )


if __name__ == "__main__":
    typer.run(main)
