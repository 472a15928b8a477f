"""DVC stage extract: the raw source named by data.source -> data/extracted, metrics/data.json (+ _details)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402

from covidseg.atomic import details_path_for  # noqa: E402
from covidseg.data.extract import ExtractError, extract  # noqa: E402
from covidseg.data.sources import SourceError  # noqa: E402
from covidseg.params import DataParams, load_section  # noqa: E402

MAX_MESSAGES = 50


def main(
    out: str = "data/extracted", metrics: str = "metrics/data.json", details: str = "", params: str = "params.yaml"
) -> None:
    p = load_section(DataParams, "data", params)
    try:
        report = extract(
            p.source, out, metrics, p, details_path=details or None
        )  # default: <metrics stem>_details.json beside it
    except (SourceError, ExtractError) as exc:
        typer.echo(f"extract failed: {exc}", err=True)
        details = details or details_path_for(metrics)
        typer.echo(
            f"Nothing was half-written, but under `dvc repro` DVC removed {out}, {metrics} and {details} before "
            f"this stage ran; get the last good ones back with `git checkout -- {metrics} && dvc checkout extract` "
            "(`dvc pull extract` on a fresh clone with a remote; docs/recovery.md)",
            err=True,
        )
        raise typer.Exit(1) from None
    for line in report.messages[:MAX_MESSAGES]:
        typer.echo(line, err=True)
    if len(report.messages) > MAX_MESSAGES:
        typer.echo(f"... and {len(report.messages) - MAX_MESSAGES} more (all skips: {out}/skipped.csv)", err=True)
    typer.echo(f"extract: took {report.counts} triplets from {p.source}; skipped {report.skipped_total}")


if __name__ == "__main__":
    typer.run(main)
