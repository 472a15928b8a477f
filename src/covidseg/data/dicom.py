"""Read a single-frame greyscale DICOM X-ray into uint8 (H, W) grey levels, as the dataset's PNGs are.

The pipeline follows the DICOM greyscale display chain (PS3.3 C.11 / PS3.4 N.2):

1. Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence);
2. VOI LUT Sequence, or else Window Center/Width, when the file has one;
3. one inversion where the film is to be shown inverted, so bone is bright as in COVID-QU-Ex:
   MONOCHROME1 (the lowest value is white; PS3.3 pairs it with Presentation LUT Shape INVERSE, so
   an IDENTITY there is a writer's error and is not followed), and a MONOCHROME2 film whose
   Presentation LUT Shape is INVERSE (a Presentation LUT Sequence is not applied: only the shape);
4. linear scaling to 0..255 by the *nominal* output range of the last step: the window's or VOI
   LUT's output range, or with neither the stored range (0 .. 2**BitsStored - 1, or the signed
   range) carried through the modality LUT.

Never a per-image min-max stretch: the same stored value gives the same grey level in every file
with the same header, so the model sees what the acquisition meant.

Compressed pixel data is decoded by pydicom's plugins: GDCM (python-gdcm, BSD licence) for JPEG
baseline and extended, JPEG Lossless (Process 14 and its Selection Value 1, which most CR and DX
exports use), JPEG-LS, JPEG 2000 and RLE; pyjpegls (MIT) for JPEG-LS and Pillow for baseline JPEG
and JPEG 2000 where present. pylibjpeg-libjpeg is not used: it is GPL-3.0 and this project is MIT.
A transfer syntax none of them decodes is refused in one line naming the file and the syntax.
"""

from __future__ import annotations

import math
from io import BytesIO
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

DICM_OFFSET = 128  # after the 128-byte preamble (PS3.10 7.1)
DECODING_PLUGIN = ""  # "": the first pydicom plugin that can decode the syntax; tests set "gdcm" to test it alone


class DicomError(ValueError):
    """A DICOM file this module refuses (the message names the file and the reason)."""


def is_dicom(data: bytes) -> bool:
    """True when ``data`` carries the ``DICM`` marker at byte 128 (a DICOM Part 10 file), whatever its name."""
    return data[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"


def decode_dicom(data: bytes, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one DICOM file's bytes.

    Args:
        data: the whole file (Part 10, with preamble and ``DICM`` marker).
        name: shown in error messages (usually the file path).
    Returns:
        (uint8 (H, W) grey levels, bone bright; info dict with ``PhotometricInterpretation``,
        ``BitsStored``, ``window`` (True when a VOI LUT or window was applied),
        ``PresentationLUTShape`` (the one applied), ``TransferSyntaxUID``, ``pixel_area_mm2`` and
        ``spacing_source`` (:func:`pixel_area`), ``header`` (:func:`reference_header`),
        ``ViewPosition`` and ``BodyPartExamined`` ("" when absent) and
        ``SOPInstanceUID`` when the file has one).
    Raises:
        DicomError: not DICOM, no pixel data, multi-frame, colour, or a compressed transfer
            syntax that pydicom cannot decode without extra handlers.
    """
    if not is_dicom(data):
        raise DicomError(f"{name}: not a DICOM file (no 'DICM' marker at byte {DICM_OFFSET})")
    try:
        ds = dcmread(BytesIO(data), force=False)
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise DicomError(f"{name}: unreadable DICOM ({exc})") from None
    if "PixelData" not in ds:
        raise DicomError(f"{name}: DICOM has no image (no PixelData element)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"{name}: multi-frame DICOM ({frames} frames) not supported; expected one X-ray")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(
            f"{name}: photometric interpretation {photometric or 'missing'!r} not supported; "
            "expected greyscale MONOCHROME1 or MONOCHROME2"
        )
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        if DECODING_PLUGIN:
            ds.pixel_array_options(decoding_plugin=DECODING_PLUGIN)
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/... for missing handlers
        # pydicom's message lists every plugin on many lines: one line here, the first of it at most.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
        if syntax is not None and syntax.is_compressed:
            raise DicomError(
                f"{name}: cannot decode its compressed pixel data, transfer syntax {syntax.name} ({syntax}): "
                f"{_one_line(reason)}"
            ) from None
        raise DicomError(f"{name}: cannot decode pixel data ({type(exc).__name__}: {_one_line(reason)})") from None
    if stored.ndim != 2:
        raise DicomError(f"{name}: expected one 2-D greyscale frame, got pixel array of shape {stored.shape}")

    lo, hi = _modality_range(ds)
    values = apply_modality_lut(stored, ds)
    has_window = bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_window:
        try:
            values = apply_voi_lut(values, ds, index=0)
        except (ValueError, NotImplementedError) as exc:
            raise DicomError(f"{name}: invalid VOI LUT or window ({exc})") from None
        if ds.get("VOILUTSequence"):
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        # else: pydicom's windowing outputs in the modality output range (lo, hi) computed above
    scaled = (np.asarray(values, dtype=np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(stored.shape)
    scaled = np.clip(scaled, 0.0, 1.0)
    shape = presentation_shape(ds, name)
    if shape == "INVERSE":
        scaled = 1.0 - scaled
    grey = np.rint(scaled * 255.0).astype(np.uint8)

    info: dict[str, Any] = {
        "PhotometricInterpretation": photometric,
        "BitsStored": int(ds.BitsStored),
        "window": has_window,
        "PresentationLUTShape": shape,
        "TransferSyntaxUID": str(syntax) if syntax is not None else "",
    }
    if "SOPInstanceUID" in ds:
        info["SOPInstanceUID"] = str(ds.SOPInstanceUID)
    info["pixel_area_mm2"], info["spacing_source"] = pixel_area(ds)
    info["header"] = reference_header(ds)
    info["ViewPosition"] = str(ds.get("ViewPosition", "") or "")
    info["BodyPartExamined"] = str(ds.get("BodyPartExamined", "") or "")
    return grey, info


# What a derived object (covidseg's DICOM Segmentation) needs of its source film, and nothing more: the Patient
# and General Study modules' attributes the standard requires a SEG to copy (so that it joins the film's patient
# and study), the UIDs it references, and the film's geometry. Everything else (institution, operators,
# acquisition details, private tags) is left out.
PATIENT_STUDY_ATTRIBUTES = (
    "PatientName",  # Patient module, Type 2: present, may be empty
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",  # General Study module: Type 1
    "StudyDate",  # Type 2 from here on
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
REFERENCE_ATTRIBUTES = PATIENT_STUDY_ATTRIBUTES + (
    "SpecificCharacterSet",  # how the names above are encoded: without it a SEG's non-ASCII name is garbled
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def reference_header(ds: Any) -> Any:
    """A new Dataset with only :data:`REFERENCE_ATTRIBUTES` of ``ds``; the Type 2 patient and study attributes the
    film lacks are present and empty (as the standard allows), so a SEG can be built from any film."""
    from pydicom.dataset import Dataset

    header = Dataset()
    for keyword in REFERENCE_ATTRIBUTES:
        if keyword in ds:
            setattr(header, keyword, ds[keyword].value)
        elif keyword in PATIENT_STUDY_ATTRIBUTES and keyword != "StudyInstanceUID":
            setattr(header, keyword, None)
    return header


def pixel_area(ds: Any) -> tuple[float | None, str]:
    """(mm^2 of one pixel at the patient, where it comes from), or (None, "") when the file gives no usable spacing.

    In this order: Pixel Spacing (0028,0030), which for projection radiography is the spacing in the
    patient (calibrated, or already corrected for magnification by the modality), unless it merely
    repeats Imager Pixel Spacing with no Pixel Spacing Calibration Type (then it is the detector's and
    is treated as Imager Pixel Spacing); else Imager Pixel
    Spacing (0018,1164), the detector's, divided by the Estimated Radiographic Magnification Factor
    (0018,1114) when the file has one, since the patient's anatomy is magnified onto the detector; else
    Imager Pixel Spacing as it is (detector plane: areas come out larger by the magnification squared,
    about 1.1^2 for a PA chest film, and the source says so). Spacings are [row, column] in mm;
    anything but two positive finite numbers counts as absent.
    """
    pixel, imager = _spacing(ds.get("PixelSpacing")), _spacing(ds.get("ImagerPixelSpacing"))
    # Many projection exports copy the detector's spacing into Pixel Spacing without calibrating it: the same
    # values and no Pixel Spacing Calibration Type mean the detector plane, not the patient.
    copied = pixel is not None and pixel == imager and not ds.get("PixelSpacingCalibrationType")
    if pixel and not copied:
        return pixel[0] * pixel[1], "PixelSpacing"
    if not imager:
        return None, ""
    try:
        factor = float(ds.get("EstimatedRadiographicMagnificationFactor", 0) or 0)
    except (TypeError, ValueError):
        factor = 0.0
    if math.isfinite(factor) and factor > 0:
        return imager[0] * imager[1] / factor**2, "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    return imager[0] * imager[1], "ImagerPixelSpacing (detector plane)"


def _spacing(value: Any) -> tuple[float, float] | None:
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return pair if len(pair) == 2 and all(math.isfinite(v) and v > 0 for v in pair) else None  # type: ignore[return-value]


def presentation_shape(ds: Any, name: str) -> str:
    """The inversion applied, IDENTITY or INVERSE: INVERSE for MONOCHROME1 (whatever the shape says: PS3.3 requires
    INVERSE with it, so IDENTITY there is a writer's error, and a MONOCHROME1 film shown uninverted is a negative)
    and for a MONOCHROME2 film marked INVERSE; IDENTITY otherwise."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if shape and shape not in ("IDENTITY", "INVERSE"):
        raise DicomError(f"{name}: Presentation LUT Shape {shape!r} not supported; expected IDENTITY or INVERSE")
    monochrome1 = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    return "INVERSE" if monochrome1 or shape == "INVERSE" else "IDENTITY"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _modality_range(ds: Any) -> tuple[float, float]:
    """Nominal (low, high) of the values after the modality LUT, as pydicom's windowing assumes.

    Stored range from BitsStored and PixelRepresentation, carried through Rescale Slope/Intercept;
    with a Modality LUT Sequence, 0 .. 2**(LUT entry bits) - 1.
    """
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi
