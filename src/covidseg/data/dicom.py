"""Read a single-frame greyscale DICOM X-ray into uint8 (H, W) grey levels, as the dataset's PNGs are.

The pipeline follows the DICOM greyscale display chain (PS3.3 C.11 / PS3.4 N.2):

1. Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence);
2. VOI LUT Sequence, or else Window Center/Width, when the file has one;
3. MONOCHROME1 inverted, so bone is bright as in COVID-QU-Ex;
4. linear scaling to 0..255 by the *nominal* output range of the last step: the window's or VOI
   LUT's output range, or with neither the stored range (0 .. 2**BitsStored - 1, or the signed
   range) carried through the modality LUT.

Never a per-image min-max stretch: the same stored value gives the same grey level in every file
with the same header, so the model sees what the acquisition meant.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

DICM_OFFSET = 128  # after the 128-byte preamble (PS3.10 7.1)


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
        ``BitsStored``, ``window`` (True when a VOI LUT or window was applied) and
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
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/... for missing handlers
        if syntax is not None and syntax.is_compressed:
            raise DicomError(
                f"{name}: compressed (transfer syntax {syntax.name}, {syntax}) not supported "
                f"({type(exc).__name__}: {exc})"
            ) from None
        raise DicomError(f"{name}: cannot decode pixel data ({type(exc).__name__}: {exc})") from None
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
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled  # MONOCHROME1: the lowest value is white
    grey = np.rint(scaled * 255.0).astype(np.uint8)

    info: dict[str, Any] = {
        "PhotometricInterpretation": photometric,
        "BitsStored": int(ds.BitsStored),
        "window": has_window,
    }
    if "SOPInstanceUID" in ds:
        info["SOPInstanceUID"] = str(ds.SOPInstanceUID)
    return grey, info


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
