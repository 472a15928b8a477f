"""A DICOM Segmentation (highdicom) of one prediction, so OHIF, 3D Slicer or a PACS shows it over the source film.

Two BINARY segments at the film's own size: 1 "COVID-19 infection" (SNOMED CT: category
Morphologically Abnormal Structure, type Lesion, in the Lung) and, for models with a lung head,
2 "lungs" (Anatomical Structure, Lung). They overlap, so they are two segments, not a label map.
Each segment names the algorithm: covidseg, its version, the model's training code hash and file.
The SEG joins the film's patient and study and references its Study, Series and SOP Instance UIDs;
its header holds only what the standard requires it to copy from the source
(:data:`covidseg.data.dicom.REFERENCE_ATTRIBUTES`): the caller hands in that pruned copy.

The SEG's Series and SOP Instance UIDs are derived from the source's UIDs, the model file's SHA-256,
its training code hash and the threshold and flip averaging used, so predicting the same film with
the same model and settings again gives the same instance (a PACS replaces it instead of piling up
copies), and another model or setting gives another series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covidseg import __version__
from covidseg.atomic import atomic_path

SERIES_DESCRIPTION = "covidseg - research use only, not a medical device"  # LO: at most 64 characters
SERIES_NUMBER = 9901  # high, so it sorts after the acquisition's own series in a viewer


class DicomSegError(ValueError):
    """A SEG that cannot be built for a film (the message names the film and the reason)."""


@dataclass(frozen=True)
class SegAlgorithm:
    """What the SEG says made it: the model file's name and its training code hash (``""`` when unknown), and
    ``fingerprint``: whatever else changes the masks (the model file's SHA-256, the threshold, flip averaging),
    so that another model or setting never reuses a SEG's UIDs."""

    model_name: str
    code_hash: str = ""
    fingerprint: str = ""


def write_dicom_seg(
    path: str | Path, header: Any, infection: np.ndarray, lungs: np.ndarray | None, algorithm: SegAlgorithm, name: str
) -> Path:
    """Atomically write the SEG of bool (H, W) ``infection`` (and ``lungs``) over the film ``header`` describes.

    ``header``: the pruned source header (:func:`covidseg.data.dicom.reference_header`), with the
    film's Rows and Columns equal to (H, W). ``name`` names the film in errors. Raises DicomSegError.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    height, width = infection.shape
    if (int(header.get("Rows", -1)), int(header.get("Columns", -1))) != (height, width):
        raise DicomSegError(
            f"{name}: masks are {height}x{width} but the film's header says "
            f"{header.get('Rows')}x{header.get('Columns')}; no DICOM SEG written"
        )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not header.get(keyword):
            raise DicomSegError(f"{name}: the film has no {keyword}, which a DICOM SEG must reference")
    identification = hd.AlgorithmIdentificationSequence(
        name="covidseg",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters={"model": algorithm.model_name, "training_code_hash": algorithm.code_hash or "unknown"},
    )
    automatic = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    segments = [
        hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="COVID-19 infection",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=automatic,
            algorithm_identification=identification,
            anatomic_regions=[codes.SCT.Lung],
        )
    ]
    planes = [infection]
    if lungs is not None:
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=2,
                segment_label="lungs",
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=codes.SCT.Lung,
                algorithm_type=automatic,
                algorithm_identification=identification,
            )
        )
        planes.append(lungs)
    entropy = [str(header.SOPInstanceUID), algorithm.code_hash, algorithm.model_name, algorithm.fingerprint]
    path = Path(path)
    try:
        seg = hd.seg.Segmentation(
            source_images=[header],
            pixel_array=np.stack(planes, axis=-1)[None].astype(bool),  # (1 frame, H, W, segments)
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=generate_uid(entropy_srcs=[str(header.SeriesInstanceUID), *entropy[1:]]),
            series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(entropy_srcs=entropy),
            instance_number=1,
            manufacturer="covidseg",
            manufacturer_model_name=algorithm.model_name or "covidseg",
            software_versions=__version__,
            device_serial_number="none",
            series_description=SERIES_DESCRIPTION,
            omit_empty_frames=False,  # every segment keeps its frame, also an empty one
        )
        with atomic_path(path, sweep=False) as tmp:
            seg.save_as(tmp)
    except OSError:
        raise  # the output folder's problem: predict handles it like any other write error
    except Exception as exc:  # highdicom and pydicom raise many types for a header they cannot use
        raise DicomSegError(f"{name}: cannot build a DICOM SEG ({' '.join(str(exc).split())[:200]})") from None
    return path
