"""DVC stage preprocess: data/extracted -> data/prepared/{train,val,test}.npz at preprocess.image_size."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402

from covidseg.data.preprocess import preprocess  # noqa: E402
from covidseg.params import PreprocessParams, load_section  # noqa: E402


def main(extracted: str = "data/extracted", out: str = "data/prepared", params: str = "params.yaml") -> None:
    counts = preprocess(extracted, out, load_section(PreprocessParams, "preprocess", params))
    typer.echo(f"preprocess: {counts} pairs per split -> {out}")


if __name__ == "__main__":
    typer.run(main)
