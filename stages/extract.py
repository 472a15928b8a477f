"""DVC stage extract: the raw source named by data.source -> data/extracted + metrics/data.json."""

import typer

from covidseg.extract import extract
from covidseg.params import DataParams, load_section


def main(out: str = "data/extracted", metrics: str = "metrics/data.json", params: str = "params.yaml") -> None:
    p = load_section(DataParams, "data", params)
    report = extract(p.source, out, metrics, p)
    for line in report.messages[:50]:
        typer.echo(line, err=True)
    if len(report.messages) > 50:
        typer.echo(f"... and {len(report.messages) - 50} more (see {metrics})", err=True)
    typer.echo(f"extract: took {report.counts} pairs from {p.source}; skipped {sum(sum(c.values()) for c in report.skips.values())}")


if __name__ == "__main__":
    typer.run(main)
