"""No severity where the film cannot give one: each reason on a film written here, the cells it empties, and a
lung never invented (also on the dev data's 215 real lung masks with one lung removed, when ../shared is present)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from covidseg.inference.predict import SEVERITY_COLUMNS, severity_of
from covidseg.masks.plausibility import looks_inverted, severity_refusals, view_of
from covidseg.masks.severity import split_lungs

from conftest import DEV_DATA

H, W = 200, 200
SEVERITY = tuple(c for c in SEVERITY_COLUMNS if c != "infected_outside_lungs_pct")  # the cells a refusal empties


def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


RIGHT, LEFT = ellipse(100, 55, 60, 30), ellipse(100, 145, 60, 30)  # image left = the patient's right


def chest_film() -> np.ndarray:
    """uint8 (H, W): dark lung fields beside a bright spine and mediastinum, soft tissue between."""
    grey = np.full((H, W), 150.0)
    grey[RIGHT | LEFT] = 60
    grey[:, 88:112] = 220
    return (grey + np.random.default_rng(0).normal(0, 5, (H, W))).clip(0, 255).astype(np.uint8)


def infection() -> np.ndarray:
    return ellipse(120, 55, 20, 15) | ellipse(80, 145, 10, 10)


def codes(grey, infected, lungs, **header) -> list[str]:
    return [c for c, _ in severity_refusals(grey, infected, *split_lungs(lungs), **header)]


def test_a_frontal_chest_film_with_both_lungs_gives_a_severity():
    s = severity_of(infection(), RIGHT | LEFT, grey=chest_film(), view="PA", body_part="CHEST")
    assert s["severity_status"] == "ok" and s["severity_warning"] == ""
    assert all(s[c] is not None for c in SEVERITY)
    assert s["right_lung_infected_pct"] == pytest.approx(100 * (infection() & RIGHT).sum() / RIGHT.sum())


def test_view_position_gives_the_view_column():
    assert [view_of(v) for v in ("PA", "AP", "LL", "RL", "lateral", "", "OBL", "LLD")] == [
        "PA",
        "AP",
        "lateral",
        "lateral",
        "lateral",
        "unknown",
        "unknown",
        "unknown",  # decubitus: a frontal projection of a patient lying on the side
    ]
    for chest in ("CHEST", "CHEST PA", "PORTABLE CHEST", "THORAX", "TORACE"):  # free text in practice
        assert codes(chest_film(), infection(), RIGHT | LEFT, body_part=chest) == [], chest


@pytest.mark.parametrize(
    ("header", "code"),
    [({"view": "lateral"}, "lateral"), ({"body_part": "KNEE"}, "not_chest"), ({"body_part": "HAND"}, "not_chest")],
)
def test_a_lateral_or_non_chest_film_gives_no_severity(header, code):
    s = severity_of(infection(), RIGHT | LEFT, grey=chest_film(), **header)
    assert s["severity_status"] == code
    assert all(s[c] is None for c in SEVERITY)
    assert s["infected_outside_lungs_pct"] is not None  # the evidence stays


def test_no_lung_found_is_no_severity_not_a_healthy_zero():
    # The case: no lung, almost the whole film marked infected; extent 0 would read as healthy.
    everything = np.ones((H, W), bool)
    s = severity_of(everything, np.zeros((H, W), bool), grey=chest_film())
    assert s["severity_status"].startswith("no_lungs") and s["extent_score"] is None
    assert "no lung found" in s["severity_warning"]


def test_specks_of_lung_on_pure_noise_are_not_lungs():
    noise = np.random.default_rng(1).integers(0, 256, (H, W), dtype=np.uint8)
    specks = ellipse(60, 50, 5, 5) | ellipse(60, 150, 5, 5)  # 0.2 % of the film each
    right, left = split_lungs(specks)
    assert not right.any() and not left.any()
    assert "no_lungs" in codes(noise, np.zeros((H, W), bool), specks)


def test_one_lung_keeps_its_own_numbers_and_invents_nothing_for_the_other():
    s = severity_of(infection(), RIGHT, grey=chest_film())
    assert s["severity_status"] == "one_lung" and "only the patient's right lung" in s["severity_warning"]
    assert s["right_lung_infected_pct"] == pytest.approx(100 * (infection() & RIGHT).sum() / RIGHT.sum())
    assert s["right_extent"] is not None
    for column in ("left_lung_infected_pct", "left_extent", "lungs_infected_pct", "extent_score"):
        assert s[column] is None, column


def test_a_lung_cut_by_a_notch_or_with_a_sliver_across_the_midline_stays_one_lung():
    notched = RIGHT.copy()
    notched[:, 50:58] &= np.arange(H)[:, None] > 150  # a valley in the right lung's column profile
    sliver = RIGHT | ellipse(100, 104, 40, 3)  # a thin piece just past the image's centre column
    for mask in (notched, sliver):
        right, left = split_lungs(mask)
        assert right.any() and not left.any()
    assert np.array_equal(split_lungs(notched)[0], notched)  # the two halves of the cut merged back, none dropped


def test_two_separate_regions_on_one_side_are_one_lung_and_a_refusal_not_a_merged_number():
    # A film far off centre: both lungs left of the image's centre column. Merging them would give a
    # "right lung" share over both lungs, a wrong number; the larger is kept and the severity refused.
    big, small = ellipse(100, 40, 60, 25), ellipse(100, 92, 40, 5)
    right, left = split_lungs(big | small)
    assert np.array_equal(right, big) and not left.any()
    s = severity_of(np.zeros((H, W), bool), big | small, grey=chest_film())
    assert s["severity_status"].startswith("one_lung") and s["extent_score"] is None


@pytest.mark.parametrize("scale", [0.4, 1.9])
def test_lungs_implausibly_small_or_large_for_the_film(scale):
    lungs = ellipse(100, 55, 60 * scale, 30 * scale) | ellipse(100, 145, 60 * scale, 30 * scale)
    if scale > 1:
        lungs = ellipse(100, 50, 99, 49) | ellipse(100, 150, 99, 49)  # 77 % of the film
    assert "lung_area" in codes(chest_film(), np.zeros((H, W), bool), lungs)


def test_most_predicted_infection_outside_the_lungs():
    outside = ellipse(100, 100, 40, 10) & ~(RIGHT | LEFT)
    assert codes(chest_film(), outside, RIGHT | LEFT) == ["outside"]


def test_an_inverted_or_flat_or_nearly_black_film_gives_no_severity():
    film = chest_film()
    assert not looks_inverted(film) and looks_inverted(255 - film)
    assert codes(255 - film, infection(), RIGHT | LEFT) == ["inverted"]
    flat = np.full((H, W), 120, np.uint8)
    assert codes(flat, infection(), RIGHT | LEFT) == ["low_range"]
    ten_of_twelve_bits = (film.astype(np.float64) * 1023 / 4095).astype(np.uint8)  # 0-63 of 255
    assert codes(ten_of_twelve_bits, infection(), RIGHT | LEFT) == ["low_range"]


def _dev(split: str, cls: str, folder: str) -> list:
    root = DEV_DATA / "Infection Segmentation Data" / "Infection Segmentation Data" / split / cls / folder
    return sorted(root.glob("*.png"))


@pytest.mark.skipif(not DEV_DATA.is_dir(), reason="the real dev data (../shared/data/covidqu-dev) is absent")
def test_on_the_real_lung_masks_one_lung_is_never_made_two():
    masks = [np.asarray(Image.open(p).convert("L")) > 127 for p in _dev("Test", "COVID-19", "lung masks")]
    assert len(masks) == 215
    invented = kept = 0
    for lungs in masks:
        right, left = split_lungs(lungs)
        assert right.any() and left.any()
        half = lungs.shape[1] // 2
        cut_right, cut_left = lungs.copy(), lungs.copy()
        cut_right[:, half:], cut_left[:, :half] = False, False  # the film cut off at its centre
        for one, side in ((right, "right"), (left, "left"), (cut_right, "right"), (cut_left, "left")):
            r, lft = split_lungs(one)
            if one is right or one is left:
                assert np.array_equal(r | lft, one)  # a whole lung keeps every pixel
            invented += bool(r.any() and lft.any())
            kept += bool((r if side == "right" else lft).any())
            s = severity_of(np.zeros_like(one), one)
            assert s["extent_score"] is None and s["severity_status"].startswith("one_lung")
    assert invented == 0 and kept == 4 * 215


@pytest.mark.skipif(not DEV_DATA.is_dir(), reason="the real dev data (../shared/data/covidqu-dev) is absent")
def test_no_correctly_displayed_dev_film_of_the_test_split_looks_inverted():
    films = [np.asarray(Image.open(p).convert("L")) for c in ("COVID-19", "Normal") for p in _dev("Test", c, "images")]
    assert not any(looks_inverted(f) for f in films)
    assert np.mean([looks_inverted(255 - f) for f in films]) > 0.4
