"""DVC stage plots: predictions, curves and evaluation tables -> plots/figures/*.png."""

import typer

from covidseg.figures import make_figures
from covidseg.params import PlotsParams, load_section


def main(prepared: str = "data/prepared", predictions: str = "data/predictions/test.npz",
         curves: str = "plots/train/curves.tsv", eval_dir: str = "plots/eval", per_image: str = "plots/eval/per_image.csv",
         out: str = "plots/figures", params: str = "params.yaml") -> None:
    written = make_figures(prepared, predictions, curves, eval_dir, per_image, out, load_section(PlotsParams, "plots", params))
    typer.echo(f"plots: wrote {len(written)} figures to {out}")


if __name__ == "__main__":
    typer.run(main)
