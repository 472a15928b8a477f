"""DICOM decoding: the display chain (modality LUT, window, MONOCHROME1, 8-bit scaling) and refusals, on files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidseg.data.dicom import DicomError, decode_dicom, is_dicom

from helpers import DICOM_UID, write_dicom


def decode(path: Path) -> tuple[np.ndarray, dict]:
    return decode_dicom(path.read_bytes(), str(path))


def test_monochrome2_8bit_is_identity(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    grey, info = decode(write_dicom(tmp_path / "a.dcm", pixels))
    assert grey.dtype == np.uint8 and grey.shape == (16, 16)
    np.testing.assert_array_equal(grey, pixels)
    header = info.pop("header")  # the pruned header a DICOM SEG needs (tests/test_predict_seg.py)
    assert header.SOPInstanceUID == DICOM_UID and "PixelData" not in header
    assert info == {
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsStored": 8,
        "window": False,
        "PresentationLUTShape": "IDENTITY",
        "TransferSyntaxUID": "1.2.840.10008.1.2.1",
        "SOPInstanceUID": DICOM_UID,
        "pixel_area_mm2": None,
        "spacing_source": "",
        "ViewPosition": "",
        "BodyPartExamined": "",
    }


def test_16bit_scaled_by_bits_stored_not_by_image_range(tmp_path):
    # BitsStored 12: 0..4095 -> 0..255. 2048 * 255 / 4095 = 127.53 -> 128; 1024 -> 63.77 -> 64.
    # The image's own max is 2048: a min-max stretch would have made it 255.
    pixels = np.array([[0, 1024], [2048, 2048]], dtype=np.uint16)
    grey, info = decode(write_dicom(tmp_path / "b.dcm", pixels, bits_stored=12))
    np.testing.assert_array_equal(grey, [[0, 64], [128, 128]])
    assert info["BitsStored"] == 12
    full = np.array([[0, 4095]], dtype=np.uint16)
    np.testing.assert_array_equal(decode(write_dicom(tmp_path / "c.dcm", full, bits_stored=12))[0], [[0, 255]])


def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
    pixels = np.array([[0, 255, 55]], dtype=np.uint8)
    grey, info = decode(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(grey, [[255, 0, 200]])
    assert info["PhotometricInterpretation"] == "MONOCHROME1"


def test_window_clips_outside_and_maps_centre_to_mid_grey(tmp_path):
    # 12-bit, window centre 2000, width 1001 (LINEAR, PS3.3 C.11.2.1.2.1): c' = 1999.5, w' = 1000;
    # x <= c' - w'/2 = 1499.5 -> 0; x > c' + w'/2 = 2499.5 -> 4095 (the output range 0..4095);
    # centre x = 2000: ((2000 - 1999.5) / 1000 + 0.5) * 4095 = 2049.55 -> * 255 / 4095 = 127.63 -> 128.
    # x = 1750: ((1750 - 1999.5) / 1000 + 0.5) * 255 = 0.2505 * 255 = 63.88 -> 64.
    pixels = np.array([[0, 1499, 1750, 2000, 2600, 4095]], dtype=np.uint16)
    grey, info = decode(write_dicom(tmp_path / "w.dcm", pixels, bits_stored=12, WindowCenter=2000, WindowWidth=1001))
    np.testing.assert_array_equal(grey, [[0, 0, 64, 128, 255, 255]])
    assert info["window"] is True


def test_window_applies_after_rescale(tmp_path):
    # Stored 0..4095, slope 2, intercept -1000: values -1000..7190; window centre 1000 width 2001 is in those units.
    # Stored 1000 -> 1000 (the centre): ((1000 - 999.5) / 2000 + 0.5) -> 0.50025 * 255 = 127.56 -> 128.
    pixels = np.array([[0, 1000, 3000]], dtype=np.uint16)
    grey, _ = decode(
        write_dicom(
            tmp_path / "rw.dcm",
            pixels,
            bits_stored=12,
            RescaleSlope=2,
            RescaleIntercept=-1000,
            WindowCenter=1000,
            WindowWidth=2001,
        )
    )
    np.testing.assert_array_equal(grey, [[0, 128, 255]])


def test_rescale_slope_intercept_applied_over_its_output_range(tmp_path):
    # 8-bit stored, slope 2 intercept -100: range -100..410. Stored 50 -> 0 -> (0 + 100) / 510 * 255 = 50;
    # stored 255 -> 410 -> 255; stored 0 -> -100 -> 0. Linear in the stored value, as the LUT is linear.
    pixels = np.array([[0, 50, 255]], dtype=np.uint8)
    grey, _ = decode(write_dicom(tmp_path / "r.dcm", pixels, RescaleSlope=2, RescaleIntercept=-100))
    np.testing.assert_array_equal(grey, [[0, 50, 255]])
    # A negative slope inverts, as the modality LUT says.
    grey, _ = decode(write_dicom(tmp_path / "n.dcm", pixels, RescaleSlope=-1, RescaleIntercept=0))
    np.testing.assert_array_equal(grey, [[255, 205, 0]])


def test_multiframe_refused_by_name(tmp_path):
    pixels = np.zeros((2, 4, 4), dtype=np.uint8)
    path = write_dicom(tmp_path / "cine.dcm", pixels, NumberOfFrames=2)
    with pytest.raises(DicomError, match=r"cine\.dcm: multi-frame DICOM \(2 frames\)"):
        decode(path)


def test_dicom_without_pixel_data_refused(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", None)
    with pytest.raises(DicomError, match=r"report\.dcm: DICOM has no image \(no PixelData"):
        decode(path)


def test_truncated_pixel_data_refused_by_name(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", np.zeros((8, 8), dtype=np.uint16), bits_stored=12)
    data = path.read_bytes()[:-20]  # PixelData is the last element: its length no longer matches Rows x Columns
    with pytest.raises(DicomError, match=r"cut\.dcm: (cannot decode pixel data|unreadable DICOM)"):
        decode_dicom(data, str(path))


def test_colour_refused(tmp_path):
    path = write_dicom(tmp_path / "rgb.dcm", np.zeros((4, 4), dtype=np.uint8), photometric="PALETTE COLOR")
    with pytest.raises(DicomError, match=r"rgb\.dcm: photometric interpretation 'PALETTE COLOR' not supported"):
        decode(path)


def test_dicom_recognised_by_marker_whatever_the_extension(tmp_path):
    path = write_dicom(tmp_path / "xray.png", np.full((3, 5), 7, dtype=np.uint8))
    data = path.read_bytes()
    assert is_dicom(data)
    grey, _ = decode_dicom(data, str(path))
    assert grey.shape == (3, 5) and (grey == 7).all()


def test_non_dicom_not_recognised_and_refused_by_name(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    assert not is_dicom(png)
    assert not is_dicom(b"DICM")  # the marker must be at byte 128, after the preamble
    with pytest.raises(DicomError, match=r"photo\.png: not a DICOM file"):
        decode_dicom(png, "photo.png")
