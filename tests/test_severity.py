"""Hand-checked tests of covidseg.masks.severity on synthetic masks whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covidseg.masks.severity import extent_score, lung_shares, severity_table, split_lungs

H, W = 60, 80


def ellipse(cy: float, cx: float, ry: float, rx: float, shape=(H, W)) -> np.ndarray:
    """A filled bool ellipse (H, W) centred at row ``cy``, column ``cx``."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def assert_partition(lungs, right, left):
    assert not (right & left).any()
    assert np.array_equal(right | left, lungs)


# ---------------------------------------------------------------- split_lungs


def test_two_separate_lungs_image_left_is_patient_right():
    image_left, image_right = ellipse(30, 20, 20, 12), ellipse(30, 60, 20, 12)
    lungs = image_left | image_right
    right, left = split_lungs(lungs)
    assert_partition(lungs, right, left)
    assert np.array_equal(right, image_left) and np.array_equal(left, image_right)


def test_touching_lungs_are_cut_at_the_valley_between_them():
    # Ellipses x in [18, 38] and [38, 58]: one component, touching in column 38 only.
    image_left, image_right = ellipse(30, 28, 20, 10), ellipse(30, 48, 20, 10)
    lungs = image_left | image_right
    assert (image_left & image_right).any()  # really one component
    right, left = split_lungs(lungs)
    assert_partition(lungs, right, left)
    # The cut falls in column 38: everything left of it is the patient's right lung.
    assert np.array_equal(right, lungs & (np.arange(W) < 38))
    assert (right & image_left).sum() >= image_left.sum() - 1 and (left & image_right).sum() >= image_right.sum() - 1


def test_lungs_joined_by_a_wide_bridge_are_still_split():
    lungs = ellipse(30, 20, 20, 12) | ellipse(30, 60, 20, 12)
    lungs[44:48, 20:61] = True  # a band under the mediastinum joining both lungs
    right, left = split_lungs(lungs)
    assert_partition(lungs, right, left)
    assert right[:, :30].sum() == lungs[:, :30].sum() and left[:, 50:].sum() == lungs[:, 50:].sum()
    assert abs(int(right.sum()) - int(left.sum())) <= 4 * 10  # symmetric up to the bridge's cut column


def test_one_lung_on_the_image_right_is_the_patients_left():
    lungs = ellipse(30, 60, 20, 12)
    right, left = split_lungs(lungs)
    assert not right.any() and np.array_equal(left, lungs)
    right, left = split_lungs(lungs[:, ::-1])  # mirrored: image left -> patient's right
    assert np.array_equal(right, lungs[:, ::-1]) and not left.any()


def test_one_lung_with_a_stray_blob_across_the_midline_stays_one_lung():
    lungs = ellipse(30, 60, 20, 12)
    lungs[5:7, 5:7] = True  # 4 spurious pixels on the image's left
    right, left = split_lungs(lungs)
    assert not right.any() and np.array_equal(left, lungs)


def test_small_blobs_go_to_the_nearer_lung_side():
    image_left, image_right = ellipse(30, 20, 20, 12), ellipse(30, 60, 20, 12)
    lungs = image_left | image_right
    lungs[2:4, 35:37] = True  # blob left of the midline (column 40)
    lungs[2:4, 44:46] = True  # blob right of it
    right, left = split_lungs(lungs)
    assert_partition(lungs, right, left)
    assert right[2:4, 35:37].all() and left[2:4, 44:46].all()


def test_one_lung_in_two_pieces_above_each_other_is_not_split():
    lungs = ellipse(15, 60, 10, 12) | ellipse(45, 60, 10, 12)
    right, left = split_lungs(lungs)
    assert not right.any() and np.array_equal(left, lungs)


def test_empty_mask_gives_two_empty_lungs():
    right, left = split_lungs(np.zeros((H, W), bool))
    assert right.shape == left.shape == (H, W) and not right.any() and not left.any()


def test_split_lungs_refuses_non_masks():
    with pytest.raises(ValueError, match="2-D"):
        split_lungs(np.zeros((2, H, W), bool))
    with pytest.raises(ValueError, match="0/1"):
        split_lungs(np.full((H, W), 0.5))


# ---------------------------------------------------------------- lung_shares


def test_lung_shares_by_hand():
    right = np.zeros((4, 6), bool)
    left = np.zeros((4, 6), bool)
    right[:, :2] = True  # 8 pixels
    left[:, 4:] = True  # 8 pixels
    infection = np.zeros((4, 6), bool)
    infection[0, 0] = infection[1, 0] = True  # 2 in the right lung
    infection[:, 5] = True  # 4 in the left lung
    infection[0, 3] = True  # 1 outside the lungs
    s = lung_shares(infection, right, left)
    assert s["right_pct"] == pytest.approx(2 / 8 * 100)  # 25
    assert s["left_pct"] == pytest.approx(4 / 8 * 100)  # 50
    assert s["lungs_pct"] == pytest.approx(6 / 16 * 100)  # 37.5
    assert s["infected_outside_lungs_pct"] == pytest.approx(1 / 7 * 100)


def test_lung_shares_empty_lung_is_nan_and_no_infection_is_zero_outside():
    right = np.zeros((4, 6), bool)
    left = np.zeros((4, 6), bool)
    left[:, 4:] = True
    s = lung_shares(np.zeros((4, 6), bool), right, left)
    assert math.isnan(s["right_pct"]) and s["left_pct"] == 0 and s["lungs_pct"] == 0
    assert s["infected_outside_lungs_pct"] == 0


def test_lung_shares_refuses_overlapping_lungs_and_mismatched_shapes():
    a = np.ones((4, 6), bool)
    with pytest.raises(ValueError, match="overlap"):
        lung_shares(a, a, a)
    with pytest.raises(ValueError, match="one shape"):
        lung_shares(np.ones((4, 5), bool), a, ~a)


# ---------------------------------------------------------------- extent_score


@pytest.mark.parametrize(
    "share, score",
    [
        (0, 0),
        (1e-9, 1),
        (24.999, 1),
        (25, 2),
        (49.999, 2),
        (50, 3),
        (74.999, 3),
        (75, 4),
        (100, 4),
    ],
)
def test_extent_score_boundaries(share, score):
    assert extent_score(share) == score
    assert isinstance(extent_score(share), int)


def test_extent_score_is_vectorised_and_scores_a_missing_lung_zero():
    shares = np.array([[0, 10, 25], [60, 80, np.nan]])
    assert extent_score(shares).tolist() == [[0, 1, 2], [3, 4, 0]]


@pytest.mark.parametrize("share", [-0.1, 100.1])
def test_extent_score_refuses_shares_outside_percent_range(share):
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        extent_score(share)


def test_quarter_share_computed_from_pixels_lands_on_the_boundary():
    # 1 of 4 pixels infected is exactly 25 %: the score must be 2, not 1 from rounding error.
    right = np.array([[True, True, True, True, False, False]])
    left = np.array([[False, False, False, False, True, True]])
    infection = np.array([[True, False, False, False, False, False]])
    assert extent_score(lung_shares(infection, right, left)["right_pct"]) == 2


# ---------------------------------------------------------------- severity_table


def test_severity_table_one_row_per_image():
    image_left, image_right = ellipse(30, 20, 20, 12), ellipse(30, 60, 20, 12)
    lungs = image_left | image_right
    heavy = image_left & (np.arange(H)[:, None] < 30)  # top half of the patient's right lung, ~50 %
    infection = np.stack([np.zeros((H, W), bool), heavy | image_right])
    infection[1, 0, 40] = True  # one infected pixel outside the lungs
    table = severity_table(infection, np.stack([lungs, lungs]), ids=["a", "b"])
    assert list(table.columns) == [
        "image",
        "right_pct",
        "left_pct",
        "lungs_pct",
        "right_extent",
        "left_extent",
        "extent_score",
        "infected_outside_lungs_pct",
    ]
    assert table["image"].tolist() == ["a", "b"]
    first, second = table.iloc[0], table.iloc[1]
    assert (first.right_pct, first.left_pct, first.extent_score, first.infected_outside_lungs_pct) == (0, 0, 0, 0)
    expected_right = 100 * heavy.sum() / image_left.sum()
    assert second.right_pct == pytest.approx(expected_right) and 40 < expected_right < 60
    assert second.left_pct == 100 and second.left_extent == 4
    assert second.right_extent == extent_score(expected_right)
    assert second.extent_score == second.right_extent + second.left_extent
    assert second.infected_outside_lungs_pct == pytest.approx(100 / (heavy.sum() + image_right.sum() + 1))
    assert table["extent_score"].dtype == np.int64


def test_severity_table_refuses_mismatched_batches():
    with pytest.raises(ValueError, match="one shape"):
        severity_table(np.zeros((2, 4, 4), bool), np.zeros((3, 4, 4), bool))
    with pytest.raises(ValueError, match="3-D"):
        severity_table(np.zeros((4, 4), bool), np.zeros((4, 4), bool))


def test_split_lungs_on_real_lung_masks(dev_data):
    """Real COVID-QU-Ex lung masks hold two lungs: both sides found, the patient's right on the image's left."""
    from PIL import Image

    folder = (
        dev_data / "Infection Segmentation Data" / "Infection Segmentation Data" / "Test" / "COVID-19" / "lung masks"
    )
    files = sorted(folder.glob("*.png"))[:40]
    assert files, f"no lung masks in {folder}"
    for f in files:
        lungs = np.array(Image.open(f).convert("L")) > 127
        right, left = split_lungs(lungs)
        assert_partition(lungs, right, left)
        assert min(right.sum(), left.sum()) >= 0.4 * max(right.sum(), left.sum()), f.name
        assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean(), f.name
