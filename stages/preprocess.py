"""DVC stage preprocess: data/extracted -> data/prepared/{train,val,test}.npz at preprocess.image_size."""

import typer

from covidseg.params import PreprocessParams, load_section
from covidseg.preprocess import preprocess


def main(extracted: str = "data/extracted", out: str = "data/prepared", params: str = "params.yaml") -> None:
    counts = preprocess(extracted, out, load_section(PreprocessParams, "preprocess", params))
    typer.echo(f"preprocess: {counts} pairs per split -> {out}")


if __name__ == "__main__":
    typer.run(main)
