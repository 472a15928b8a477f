"""Decoding of wide images: 12-bit data in 16-bit files (with and without PNG sBIT), 16-bit
TIFF, float TIFF; the low-contrast warning; and predict on a 12-bit X-ray."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.data.decode import BadImageError, decode, low_range_warning, png_significant_bits, scale_to_uint8
from covidseg.inference.predict import read_csv

LEVELS = np.array([[0, 1, 2048, 4095], [100, 1000, 3000, 4000]], dtype=np.uint16)
# round(v * 255 / 4095) by hand: 1 -> 0.06, 2048 -> 127.53, 100 -> 6.23, 1000 -> 62.27, 3000 -> 186.81, 4000 -> 249.08
TWELVE_BIT = np.array([[0, 0, 128, 255], [6, 62, 187, 249]], dtype=np.uint8)


def png16(arr: np.ndarray, sbit: int | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    return buf.getvalue()


def test_twelve_bit_png_without_sbit_is_read_as_twelve_bit():
    data = png16(LEVELS)
    assert png_significant_bits(data, "x") is None
    grey, mode = decode(data, "x.png")
    assert mode.startswith("I")
    np.testing.assert_array_equal(grey, TWELVE_BIT)  # not /65535 (which gives 0-16: near-black)


def test_sbit_sets_the_full_scale():
    data = png16(LEVELS, sbit=14)  # declared 14-bit: 4095 is a quarter of full scale
    assert png_significant_bits(data, "x") == 14
    grey, _ = decode(data, "x.png")
    np.testing.assert_array_equal(grey, np.round(LEVELS.astype(np.float64) * 255 / 16383).astype(np.uint8))
    assert grey.max() == 64  # 4095 * 255 / 16383 = 63.74

    twelve, _ = decode(png16(LEVELS, sbit=12), "x.png")
    np.testing.assert_array_equal(twelve, TWELVE_BIT)


def test_sbit_with_values_stretched_to_sixteen_bits_follows_the_png_spec():
    """The PNG spec stores 12-bit data scaled to 0-65535 (sBIT says 12): read as 16-bit."""
    stretched = (LEVELS.astype(np.uint32) * 65535 // 4095).astype(np.uint16)
    grey, _ = decode(png16(stretched, sbit=12), "x.png")
    np.testing.assert_array_equal(grey, np.round(stretched.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert np.abs(grey.astype(int) - TWELVE_BIT).max() <= 1


def test_bad_sbit_is_a_clear_error():
    with pytest.raises(BadImageError, match=r"bad\.png: PNG sBIT chunk declares 17 significant bits"):
        decode(png16(LEVELS, sbit=17), "bad.png")


def test_full_sixteen_bit_and_eight_bit_values_in_sixteen_bit_files():
    full = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(decode(png16(full), "x")[0], [[0, 1, 128, 255]])
    small = np.array([[0, 17, 200, 255]], dtype=np.uint16)  # max < 256: 8-bit values, kept as they are
    np.testing.assert_array_equal(decode(png16(small), "x")[0], [[0, 17, 200, 255]])


def test_sixteen_bit_tiff_uses_the_same_rule():
    grey, mode = decode(tiff(LEVELS), "x.tif")
    assert mode.startswith("I;16")
    np.testing.assert_array_equal(grey, TWELVE_BIT)


def test_float_tiff_fractions_and_counts():
    fractions = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)  # 63.75 -> 64, 127.5 -> 128 (half to even)
    grey, mode = decode(tiff(fractions), "f.tif")
    assert mode == "F"
    np.testing.assert_array_equal(grey, [[0, 64, 128, 255]])
    counts = LEVELS.astype(np.float32)  # max 4000 > 1: read as 12-bit counts
    np.testing.assert_array_equal(decode(tiff(counts), "f.tif")[0], TWELVE_BIT)
    with pytest.raises(BadImageError, match=r"neg\.tif: image holds negative values"):
        decode(tiff(np.array([[-1.0, 0.5]], dtype=np.float32)), "neg.tif")
    with pytest.raises(BadImageError, match=r"nan\.tif: image holds NaN"):
        decode(tiff(np.array([[np.nan, 0.5]], dtype=np.float32)), "nan.tif")


def test_scale_to_uint8_for_a_decoder_that_knows_bits_stored():
    np.testing.assert_array_equal(scale_to_uint8(LEVELS, significant_bits=12), TWELVE_BIT)
    np.testing.assert_array_equal(scale_to_uint8(np.array([[0, 1023]], np.int32), 10), [[0, 255]])


def test_eight_bit_grey_is_untouched():
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG")
    grey, mode = decode(buf.getvalue(), "g.png")
    assert mode == "L"
    np.testing.assert_array_equal(grey, g)


def test_low_range_warning():
    flat = np.full((20, 20), 9, np.uint8)
    flat[0, 0] = 200  # one bright pixel does not make contrast
    warning = low_range_warning(flat, "scan.png")
    assert warning is not None and warning.startswith("scan.png: almost no contrast") and "9-9" in warning
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (4, 1))
    assert low_range_warning(ramp, "ramp.png") is None


def test_predict_on_a_twelve_bit_xray_matches_its_eight_bit_version(tmp_path: Path):
    from helpers import FAST_PREDICT_FLAGS, grey_array, make_predict_model

    g8 = grey_array(64, 48, seed=2)
    g12 = np.round(g8.astype(np.float64) * 4095 / 255).astype(np.uint16)  # the same X-ray stored as 12-bit
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(g8).save(d / "eight.png")
    (d / "twelve.png").write_bytes(png16(g12))
    Image.fromarray(np.full((30, 30), 3, np.uint8)).save(d / "blank.png")
    model = make_predict_model(tmp_path / "m.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict", str(d), "--model", str(model), "--out", str(out), "--save-probs", *FAST_PREDICT_FLAGS]
    )
    assert result.exit_code == 0, result.output
    overlay12 = np.asarray(Image.open(out / "overlays" / "twelve.png").convert("L"), dtype=np.float64)
    overlay8 = np.asarray(Image.open(out / "overlays" / "eight.png").convert("L"), dtype=np.float64)
    assert abs(overlay12.mean() - overlay8.mean()) <= 1.0  # not near-black
    np.testing.assert_allclose(np.load(out / "probs" / "twelve.npy"), np.load(out / "probs" / "eight.npy"), atol=1e-5)
    rows = {r["stem"]: r for r in read_csv(out / "predictions.csv")}
    assert rows["twelve"]["warning"] == rows["eight"]["warning"] == ""
    assert rows["blank"]["status"] == "ok" and "almost no contrast" in rows["blank"]["warning"]
    assert f"warning: {d / 'blank.png'}: almost no contrast" in result.stderr
