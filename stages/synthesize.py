"""DVC stage synthesize: params synth.* and seed -> data/raw/synthetic (Kaggle layout)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402

from covidseg.data.synth import synthesize  # noqa: E402
from covidseg.params import SynthParams, load_section, load_seed  # noqa: E402


def main(out: str = "data/raw/synthetic", params: str = "params.yaml") -> None:
    counts = synthesize(out, load_section(SynthParams, "synth", params), load_seed(params))
    typer.echo(f"synthesize: wrote {counts} images per split to {out}")


if __name__ == "__main__":
    typer.run(main)
