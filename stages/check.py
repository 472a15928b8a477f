"""DVC stage check: params.yaml (+ data.source when no stage makes it) -> data/checked.txt, a constant stamp.

Every other stage depends on the stamp, so invalid params or a bad source stop `dvc repro` here,
before DVC removes any stage's outputs (docs/recovery.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402
import yaml  # noqa: E402

from covidseg.check import check  # noqa: E402
from covidseg.data.sources import SourceError  # noqa: E402
from covidseg.params import ParamsError  # noqa: E402


def _outs(dvc_yaml: str) -> list[str]:
    """Every output path declared in dvc.yaml."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"]
    return [
        o if isinstance(o, str) else next(iter(o))
        for s in stages.values()
        for kind in ("outs", "metrics", "plots")
        for o in s.get(kind, [])
    ]


def main(stamp: str = "data/checked.txt", params: str = "params.yaml", dvc_yaml: str = "dvc.yaml") -> None:
    try:
        found = check(params, stamp, _outs(dvc_yaml))
    except (ParamsError, SourceError, OSError) as exc:  # bad input: one line naming the file, never a traceback
        typer.echo(f"check failed; no stage ran and every stage's previous outputs are still in place: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"check: params valid; data source {found}")


if __name__ == "__main__":
    typer.run(main)
