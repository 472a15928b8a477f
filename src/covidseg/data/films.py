"""Decode one film of any format extraction and ``covidseg predict`` read: PNG, JPEG, 16-bit, DICOM."""

from __future__ import annotations

import numpy as np

from covidseg.data.decode import BadImageError, decode, is_image_start
from covidseg.data.dicom import DICM_OFFSET, DicomError, decode_dicom, is_dicom

# Enough bytes to tell an image signature or the DICOM marker (after the 128-byte preamble).
FILM_HEAD_BYTES = DICM_OFFSET + 4
DICOM_MODE = "DICOM"


def is_film_start(head: bytes) -> bool:
    """Whether a file's first :data:`FILM_HEAD_BYTES` bytes start an image or a DICOM Part 10 file."""
    return is_image_start(head) or is_dicom(head)


def decode_film(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """uint8 (H, W) grey levels (bone bright) and the file's PIL mode, or ``"DICOM"``.

    A file with the DICOM marker is read through the DICOM display chain
    (:func:`covidseg.data.dicom.decode_dicom`), any other by :func:`covidseg.data.decode.decode`.
    Raises BadImageError naming ``name``.
    """
    if is_dicom(data):
        try:
            grey, _ = decode_dicom(data, name)
        except DicomError as exc:
            raise BadImageError(str(exc)) from None
        return grey, DICOM_MODE
    return decode(data, name)
