"""DVC stage synthesize: params synth.* and seed -> data/raw/synthetic (Kaggle layout)."""

import typer

from covidseg.params import SynthParams, load_section, load_seed
from covidseg.synth import synthesize


def main(out: str = "data/raw/synthetic", params: str = "params.yaml") -> None:
    counts = synthesize(out, load_section(SynthParams, "synth", params), load_seed(params))
    typer.echo(f"synthesize: wrote {counts} images per split to {out}")


if __name__ == "__main__":
    typer.run(main)
