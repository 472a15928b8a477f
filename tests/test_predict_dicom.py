"""`covidseg predict` on DICOM inputs: the display chain wired in, found by marker, refusals as error rows, UID in the CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from covidseg.inference.predict import collect_inputs, read_csv

from helpers import DICOM_UID, FAST_PREDICT_FLAGS, grey_array, invoke_predict, make_lung_head_model, write_dicom

W, H = 60, 50


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A tiny U-Net with a lung head whose (scaled-up) outputs give masks with both classes."""
    return make_lung_head_model(tmp_path / "model.pt")


@pytest.fixture
def grey() -> np.ndarray:
    """uint8 (H, W) X-ray-like grey levels (a gradient with noise)."""
    return grey_array(W, H, seed=7)


def png(path: Path, grey: np.ndarray) -> Path:
    Image.fromarray(grey).save(path, format="PNG")
    return path


def predict(tmp_path: Path, model: Path, *inputs: Path, out: str = "out"):
    result = invoke_predict(*inputs, "--model", model, "--out", tmp_path / out, "--save-probs", *FAST_PREDICT_FLAGS)
    rows = {r["stem"]: r for r in read_csv(tmp_path / out / "predictions.csv")}
    return result, rows


def outputs(out: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(Image.open(out / "masks" / f"{stem}.png")), np.load(out / "probs" / f"{stem}.npy")


def assert_same_prediction(out: Path, stem: str, reference: str) -> None:
    mask, prob = outputs(out, stem)
    ref_mask, ref_prob = outputs(out, reference)
    np.testing.assert_array_equal(prob, ref_prob)
    np.testing.assert_array_equal(mask, ref_mask)
    assert 0 < (mask > 0).mean() < 1  # a mask with both classes, so the comparison means something


def test_monochrome1_is_predicted_like_its_inverted_monochrome2_twin(tmp_path, model, grey):
    m2 = write_dicom(tmp_path / "m2.dcm", grey)
    m1 = write_dicom(tmp_path / "m1.dcm", 255 - grey, photometric="MONOCHROME1")
    result, rows = predict(tmp_path, model, png(tmp_path / "ref.png", grey), m2, m1)
    assert result.exit_code == 0, result.output
    assert rows["m1"]["status"] == rows["m2"]["status"] == "ok"
    assert (rows["m1"]["width"], rows["m1"]["height"]) == (str(W), str(H))
    assert_same_prediction(tmp_path / "out", "m2", "ref")
    assert_same_prediction(tmp_path / "out", "m1", "ref")


def test_window_is_applied(tmp_path, model, grey):
    # 12-bit stored 1500 + 4 * g; window centre 2010.5, width 1021 (PS3.3 C.11.2.1.2.1) maps it back to g:
    # ((x - 2010) / 1020 + 0.5) * 255 = g. Scaling by BitsStored instead would give about (1500 + 4g) / 16.
    stored = (1500 + 4 * grey.astype(np.uint16)).astype(np.uint16)
    grey = grey.copy()
    grey[:3, :3], stored[:3, :3] = 0, 100  # below the window: clipped to black
    windowed = write_dicom(tmp_path / "win.dcm", stored, bits_stored=12, WindowCenter="2010.5", WindowWidth="1021")
    result, rows = predict(tmp_path, model, png(tmp_path / "ref.png", grey), windowed)
    assert result.exit_code == 0, result.output
    assert_same_prediction(tmp_path / "out", "win", "ref")


def test_16bit_with_12_bits_stored_is_scaled_by_bits_stored(tmp_path, model, grey):
    stored = np.rint(grey * (4095 / 255)).astype(np.uint16)  # 0..4095 stands for 0..255
    assert stored.max() < 4000  # the image does not span the full range: a min-max stretch would differ
    path = write_dicom(tmp_path / "b12.dcm", stored, bits_stored=12)
    result, rows = predict(tmp_path, model, png(tmp_path / "ref.png", grey), path)
    assert result.exit_code == 0, result.output
    assert_same_prediction(tmp_path / "out", "b12", "ref")


def test_multiframe_is_refused_by_name_and_the_others_still_run(tmp_path, model, grey):
    cine = write_dicom(tmp_path / "cine.dcm", np.stack([grey, grey]), NumberOfFrames=2)
    good = write_dicom(tmp_path / "good.dcm", grey)
    result, rows = predict(tmp_path, model, cine, good)
    assert result.exit_code == 1
    assert f"error: {cine}: multi-frame DICOM (2 frames) not supported" in result.stderr
    assert rows["cine"]["status"] == "error" and "multi-frame" in rows["cine"]["error"]
    assert rows["cine"]["sop_instance_uid"] == "" and not (tmp_path / "out" / "masks" / "cine.png").exists()
    assert rows["good"]["status"] == "ok" and (tmp_path / "out" / "masks" / "good.png").is_file()


def test_dicoms_in_a_folder_are_found_by_marker_whatever_their_name(tmp_path, model, grey):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_dicom(folder / "disguised.png", grey, SOPInstanceUID="1.2.3.1")
    write_dicom(folder / "IM0001", grey, SOPInstanceUID="1.2.3.2")
    write_dicom(folder / "upper.DICOM", grey, SOPInstanceUID="1.2.3.3")
    (folder / "README").write_text("not an image, and no suffix: left out\n" * 10)
    png(folder / "plain.png", grey)
    assert [p.name for p in collect_inputs([str(folder)])] == ["IM0001", "disguised.png", "plain.png", "upper.DICOM"]
    result, rows = predict(tmp_path, model, folder)
    assert result.exit_code == 0, result.output
    assert {s: r["sop_instance_uid"] for s, r in rows.items()} == {
        "IM0001": "1.2.3.2",
        "disguised": "1.2.3.1",
        "plain": "",
        "upper": "1.2.3.3",
    }
    for stem in ("IM0001", "disguised", "upper"):
        assert_same_prediction(tmp_path / "out", stem, "plain")


def test_a_dcm_that_is_not_dicom_is_an_error_row(tmp_path, model, grey):
    fake = png(tmp_path / "fake.dcm", grey)  # a PNG named .dcm: refused as DICOM, not silently read as PNG
    real = write_dicom(tmp_path / "real.dcm", grey)
    result, rows = predict(tmp_path, model, fake, real)
    assert result.exit_code == 1
    assert rows["fake"]["status"] == "error"
    assert rows["fake"]["error"] == f"{fake}: not a DICOM file (no 'DICM' marker at byte 128)"
    assert rows["real"]["status"] == "ok" and rows["real"]["sop_instance_uid"] == DICOM_UID


def test_sop_instance_uid_is_in_the_csv(tmp_path, model, grey):
    result, rows = predict(tmp_path, model, write_dicom(tmp_path / "x.dcm", grey), png(tmp_path / "y.png", grey))
    assert result.exit_code == 0, result.output
    assert rows["x"]["sop_instance_uid"] == DICOM_UID and rows["y"]["sop_instance_uid"] == ""
    header = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("height") + 1] == "sop_instance_uid"


@pytest.mark.parametrize(
    ("attrs", "area", "source"),
    [
        ({"PixelSpacing": [0.2, 0.25]}, 0.05, "PixelSpacing"),
        # Pixel Spacing wins: it is the spacing in the patient
        ({"PixelSpacing": [0.2, 0.25], "ImagerPixelSpacing": [0.3, 0.3]}, 0.05, "PixelSpacing"),
        (
            {"ImagerPixelSpacing": [0.22, 0.22], "EstimatedRadiographicMagnificationFactor": 1.1},
            0.04,
            "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor",
        ),
        ({"ImagerPixelSpacing": [0.2, 0.3]}, 0.06, "ImagerPixelSpacing (detector plane)"),
        # Pixel Spacing that only repeats the detector's, uncalibrated: the detector plane, corrected when it can be
        (
            {
                "PixelSpacing": [0.22, 0.22],
                "ImagerPixelSpacing": [0.22, 0.22],
                "EstimatedRadiographicMagnificationFactor": 1.1,
            },
            0.04,
            "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor",
        ),
        (
            {"PixelSpacing": [0.2, 0.2], "ImagerPixelSpacing": [0.2, 0.2], "PixelSpacingCalibrationType": "GEOMETRY"},
            0.04,
            "PixelSpacing",
        ),
        ({}, None, ""),
        ({"PixelSpacing": [0.2, 0.0]}, None, ""),  # not a usable spacing: no area, never a guess
    ],
)
def test_pixel_area_comes_from_the_spacing_the_file_gives(tmp_path, attrs, area, source):
    from covidseg.data.dicom import pixel_area

    ds = dcmread(write_dicom(tmp_path / "f.dcm", np.zeros((4, 4), np.uint8), **attrs))
    got, why = pixel_area(ds)
    assert why == source
    assert got == pytest.approx(area) if area is not None else got is None


def test_lung_and_infected_areas_in_cm2_per_lung_where_the_file_gives_a_spacing(tmp_path, model, grey, monkeypatch):
    import covidseg.inference.predict as predict_mod
    from covidseg.masks.severity import split_lungs

    # The tiny model's lungs are not plausible ones; the refusals have their own tests (test_plausibility.py).
    monkeypatch.setattr(predict_mod, "severity_refusals", lambda *args, **kwargs: [])
    spaced = write_dicom(tmp_path / "spaced.dcm", grey, PixelSpacing=[0.5, 0.4])  # 0.2 mm^2 a pixel
    bare = write_dicom(tmp_path / "bare.dcm", grey)
    result, rows = predict(tmp_path, model, spaced, bare, png(tmp_path / "film.png", grey))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    infection = np.asarray(Image.open(out / "masks" / "spaced.png")) > 0
    right, left = split_lungs(np.asarray(Image.open(out / "lungs" / "spaced.png")) > 0)
    assert (right | left).any() and infection.any()
    row = rows["spaced"]
    assert row["pixel_spacing_source"] == "PixelSpacing"
    for side, lung in (("right", right), ("left", left)):
        if not lung.any():  # a lung not found has no area
            assert row[f"{side}_lung_area_cm2"] == row[f"{side}_infected_area_cm2"] == ""
            continue
        assert float(row[f"{side}_lung_area_cm2"]) == pytest.approx(lung.sum() * 0.2 / 100, abs=1e-6)
        assert float(row[f"{side}_infected_area_cm2"]) == pytest.approx((infection & lung).sum() * 0.2 / 100, abs=1e-6)
    expected = [f"{side}_{what}_area_cm2" for side in ("right", "left") for what in ("lung", "infected")]
    for stem in ("bare", "film"):  # no spacing: empty cells
        assert all(rows[stem][c] == "" for c in (*expected, "pixel_spacing_source")), rows[stem]
        assert rows[stem]["lungs_infected_pct"] != ""  # the shares are still there


def test_areas_by_hand_for_two_lungs_and_for_a_lung_not_found():
    from covidseg.inference.predict import severity_of

    lungs = np.zeros((40, 60), bool)
    lungs[5:35, 5:25] = True  # image left = the patient's right lung: 600 pixels
    lungs[5:25, 35:55] = True  # the left lung: 400 pixels
    infection = np.zeros_like(lungs)
    infection[5:15, 5:25] = True  # 200 pixels of the right lung
    s = severity_of(infection, lungs, pixel_area_mm2=0.25)  # 0.5 mm x 0.5 mm
    assert s["right_lung_area_cm2"] == pytest.approx(600 * 0.25 / 100)
    assert s["left_lung_area_cm2"] == pytest.approx(400 * 0.25 / 100)
    assert s["right_infected_area_cm2"] == pytest.approx(200 * 0.25 / 100) and s["left_infected_area_cm2"] == 0
    assert s["right_lung_infected_pct"] == pytest.approx(100 * 200 / 600)
    one = lungs.copy()
    one[:, 30:] = False
    s = severity_of(infection, one, pixel_area_mm2=0.25)
    assert s["left_lung_area_cm2"] is None and s["left_infected_area_cm2"] is None
    assert all(v is None for k, v in severity_of(infection, lungs).items() if k.endswith("_cm2"))


def test_view_column_and_no_severity_for_a_lateral_film(tmp_path, model, grey):
    lateral = write_dicom(tmp_path / "lat.dcm", grey, ViewPosition="LL", BodyPartExamined="CHEST")
    frontal = write_dicom(tmp_path / "pa.dcm", grey, ViewPosition="PA")
    result, rows = predict(tmp_path, model, lateral, frontal, png(tmp_path / "film.png", grey))
    assert result.exit_code == 0, result.output
    assert (rows["lat"]["view"], rows["pa"]["view"], rows["film"]["view"]) == ("lateral", "PA", "unknown")
    lat = rows["lat"]
    assert "lateral" in lat["severity_status"].split("+")
    assert "no severity: a lateral film" in lat["warning"]
    for column in ("right_lung_infected_pct", "left_lung_infected_pct", "lungs_infected_pct", "extent_score"):
        assert lat[column] == "", column
    assert lat["status"] == "ok" and (tmp_path / "out" / "masks" / "lat.png").is_file()  # masks still written
