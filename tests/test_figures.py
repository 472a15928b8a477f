"""covidseg.evaluation.figures on the outputs of a tiny evaluation: every figure is a real, non-blank PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidseg.evaluation.figures import FIGURES, gallery_figure, make_figures
from covidseg.params import PlotsParams

from helpers import TINY_SIZE, run_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path: Path) -> None:
    """A PNG that decodes, has a size, and is not one flat colour."""
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path}: not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 20 and im.height > 20, f"{path}: {im.size}"
        lo, hi = im.convert("L").getextrema()
        assert hi != lo, f"{path}: a single colour"


@pytest.fixture(scope="module")
def figs(tmp_path_factory) -> dict:
    return run_figures(tmp_path_factory.mktemp("figures"))


def test_every_figure_is_written_and_a_real_png(figs):
    assert [p.name for p in figs["written"]] == list(FIGURES)
    for name in FIGURES:
        assert_real_png(figs["figures"] / name)
    leftovers = [p.name for p in figs["figures"].iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_sample_index_past_the_end_is_clamped(tmp_path, figs):
    out = tmp_path / "figs"
    make_figures(
        figs["prepared"],
        figs["predictions"],
        figs["curves"],
        figs["eval"],
        figs["per_image"],
        out,
        PlotsParams(sample_index=99, gallery_size=1, dpi=50),
    )  # no metrics JSON: still works
    assert_real_png(out / "sample_overlay.png")


def test_mismatched_predictions_are_a_clear_error(tmp_path, figs):
    bad = tmp_path / "pred.npz"
    np.savez(bad, ids=np.array(["x"]), probs=np.zeros((1, TINY_SIZE, TINY_SIZE), np.uint8), threshold=0.5)
    with pytest.raises(ValueError, match=r"pred\.npz: probabilities \(1, 32, 32\) do not match"):
        make_figures(
            figs["prepared"], bad, figs["curves"], figs["eval"], figs["per_image"], tmp_path / "f", PlotsParams()
        )


def test_gallery_without_any_defined_dice(tmp_path):
    images = np.full((2, 8, 8), 100, np.uint8)
    empty = np.zeros((2, 8, 8), bool)
    fig = gallery_figure(images, empty, empty, np.array(["a", "b"]), np.array([np.nan, np.nan]))
    path = tmp_path / "g.png"
    fig.savefig(path)
    assert_real_png(path)
