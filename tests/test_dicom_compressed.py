"""Compressed DICOM films: every transfer syntax CR and DX exports use decodes to what the uncompressed file gives
(exactly for lossless syntaxes, within a stated tolerance for lossy ones), also through GDCM alone (what a core
install has); the Presentation LUT Shape; what cannot be decoded is refused in one line."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import covidseg.data.dicom as dicom_mod
from covidseg.data.dicom import DicomError, decode_dicom
from covidseg.inference.predict import read_csv

from helpers import FAST_PREDICT_FLAGS, grey_array, invoke_predict, make_lung_head_model, write_dicom

H, W = 96, 88
LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1]
# Lossy syntaxes at the encoder settings below, and the mean / largest |difference| in 8-bit grey levels allowed
# against the uncompressed film (which has pixel noise, the hardest case for a lossy coder).
LOSSY = {JPEGBaseline8Bit: (4.0, 24), JPEG2000: (2.0, 8), JPEGLSNearLossless: (1.0, 1)}
LOSSY_SETTINGS = {JPEGBaseline8Bit: "quality 90", JPEG2000: "45 dB PSNR", JPEGLSNearLossless: "NEAR 1 (12-bit)"}
LOSSY_MASK_AGREEMENT = 0.97  # the share of mask pixels a lossy film's prediction shares with the uncompressed one's


def film(bits: int = 12) -> np.ndarray:
    """A (H, W) film with smooth anatomy-like shading and noise, stored in ``bits`` of a uint16 (uint8 for 8)."""
    grey = grey_array(W, H, seed=11).astype(np.float64) / 255.0
    values = np.rint(grey * (2**bits - 1))
    return values.astype(np.uint8 if bits == 8 else np.uint16)


def compressed(path: Path, pixels: np.ndarray, syntax, bits: int) -> Path:
    """Write ``pixels`` uncompressed, then re-encode the file in ``syntax`` with the tool that can encode it."""
    write_dicom(path, pixels, bits_stored=bits, Modality="DX")
    if syntax in (JPEGLossless, JPEGLosslessSV1):
        _gdcm_recode(path, syntax)
    elif syntax == JPEGBaseline8Bit:
        ds = dcmread(path)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)
    else:  # pydicom's encoders: RLE natively, JPEG-LS with pyjpegls, JPEG 2000 with pylibjpeg-openjpeg
        ds = dcmread(path)
        options = {JPEGLSNearLossless: {"jls_error": 1}, JPEG2000: {"j2k_psnr": [45]}}.get(syntax, {})
        ds.compress(syntax, **options)
        ds.save_as(path, enforce_file_format=True)
    assert dcmread(path).file_meta.TransferSyntaxUID == syntax
    return path


def _gdcm_recode(path: Path, syntax) -> None:
    import gdcm

    target = {
        JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
        JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
    }[syntax]
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(target))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


def decode(path: Path) -> tuple[np.ndarray, dict]:
    return decode_dicom(path.read_bytes(), str(path))


def core_plugin(syntax) -> str:
    """The decoder a core install uses: GDCM, except for RLE, which pydicom decodes itself."""
    return "pydicom" if syntax == RLELossless else "gdcm"


@pytest.mark.parametrize("core", [False, True], ids=["any decoder", "core decoder only"])
@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name)
def test_lossless_syntaxes_decode_to_the_uncompressed_films_grey_levels(tmp_path, monkeypatch, syntax, core):
    monkeypatch.setattr(dicom_mod, "DECODING_PLUGIN", core_plugin(syntax) if core else "")
    pixels = film(12)
    reference, _ = decode(write_dicom(tmp_path / "raw.dcm", pixels, bits_stored=12))
    grey, info = decode(compressed(tmp_path / "packed.dcm", pixels, syntax, bits=12))
    np.testing.assert_array_equal(grey, reference)
    assert info["TransferSyntaxUID"] == syntax
    assert 40 < reference.std()  # a film with contrast, so equality means something


@pytest.mark.parametrize("core", [False, True], ids=["any decoder", "core decoder only"])
@pytest.mark.parametrize("syntax", list(LOSSY), ids=lambda s: s.name)
def test_lossy_syntaxes_decode_within_the_stated_tolerance(tmp_path, monkeypatch, syntax, core):
    monkeypatch.setattr(dicom_mod, "DECODING_PLUGIN", core_plugin(syntax) if core else "")
    bits = 8 if syntax == JPEGBaseline8Bit else 12
    pixels = film(bits)
    reference, _ = decode(write_dicom(tmp_path / "raw.dcm", pixels, bits_stored=bits))
    grey, _ = decode(compressed(tmp_path / "packed.dcm", pixels, syntax, bits=bits))
    diff = np.abs(grey.astype(int) - reference.astype(int))
    mean_allowed, max_allowed = LOSSY[syntax]
    assert diff.mean() <= mean_allowed and diff.max() <= max_allowed, (diff.mean(), diff.max())


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A tiny U-Net whose (scaled-up) outputs give masks with both classes."""
    return make_lung_head_model(tmp_path / "model.pt")


def test_predicted_masks_of_compressed_films_equal_or_track_the_uncompressed_ones(tmp_path, model):
    films = {}
    for bits in (8, 12):
        films[f"raw{bits}"] = write_dicom(tmp_path / f"raw{bits}.dcm", film(bits), bits_stored=bits)
    for i, syntax in enumerate(LOSSLESS + list(LOSSY)):
        bits = 8 if syntax == JPEGBaseline8Bit else 12
        films[f"s{i}"] = compressed(tmp_path / f"s{i}.dcm", film(bits), syntax, bits=bits)
    out = tmp_path / "out"
    result = invoke_predict(*films.values(), "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    rows = {r["stem"]: r for r in read_csv(out / "predictions.csv")}
    assert all(r["status"] == "ok" for r in rows.values()), rows

    def mask(stem: str) -> np.ndarray:
        return np.asarray(Image.open(out / "masks" / f"{stem}.png")) > 0

    for i, syntax in enumerate(LOSSLESS + list(LOSSY)):
        reference = mask("raw8" if syntax == JPEGBaseline8Bit else "raw12")
        assert 0.05 < reference.mean() < 0.95  # both classes, so agreement means something
        agreement = (mask(f"s{i}") == reference).mean()
        if syntax in LOSSLESS:
            assert agreement == 1.0, syntax.name
        else:
            assert agreement >= LOSSY_MASK_AGREEMENT, (syntax.name, LOSSY_SETTINGS[syntax], agreement)


def test_a_syntax_nothing_decodes_is_refused_in_one_line_naming_the_file_and_the_syntax(tmp_path):
    path = write_dicom(tmp_path / "video.dcm", np.zeros((4, 4), dtype=np.uint8))
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not a film"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError) as caught:
        decode(path)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400
    assert message.startswith(f"{path}: cannot decode its compressed pixel data")
    assert MPEG2MPML.name in message and str(MPEG2MPML) in message


def test_broken_compressed_data_is_refused_in_one_line(tmp_path):
    path = write_dicom(tmp_path / "jls.dcm", np.zeros((4, 4), dtype=np.uint8))
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not really jpeg-ls \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match=r"jls\.dcm: cannot decode its compressed pixel data, transfer syntax JPEG-LS"):
        decode(path)
    with pytest.raises(DicomError) as caught:
        decode(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME2", "INVERSE", True),  # the exporter says: show it inverted
        ("MONOCHROME2", "IDENTITY", False),
        ("MONOCHROME1", "INVERSE", True),  # DX's usual pairing: one inversion, not two
        ("MONOCHROME1", "IDENTITY", True),  # PS3.3 pairs MONOCHROME1 with INVERSE: a writer's error, not followed
        ("MONOCHROME1", None, True),  # absent: INVERSE for MONOCHROME1 (PS3.3 C.11.6.1)
        ("MONOCHROME2", None, False),
    ],
)
def test_the_presentation_lut_shape_decides_the_inversion(tmp_path, photometric, shape, inverted):
    pixels = film(8)
    extra = {} if shape is None else {"PresentationLUTShape": shape}
    grey, info = decode(write_dicom(tmp_path / "f.dcm", pixels, photometric=photometric, **extra))
    np.testing.assert_array_equal(grey, 255 - pixels if inverted else pixels)
    assert info["PresentationLUTShape"] == ("INVERSE" if inverted else "IDENTITY")


def test_an_unknown_presentation_lut_shape_is_refused_by_name(tmp_path):
    path = write_dicom(tmp_path / "odd.dcm", film(8), PresentationLUTShape="LOG")
    with pytest.raises(DicomError, match=r"odd\.dcm: Presentation LUT Shape 'LOG' not supported"):
        decode(path)
