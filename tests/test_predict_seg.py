"""`covidseg predict --dicom-seg` and `--id sop-uid`: a DICOM Segmentation per DICOM film that references it and
decodes to the PNG masks, carries no identifier beyond what referencing needs, and output names without paths."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from covidseg import __version__
from covidseg.data.dicom import PATIENT_STUDY_ATTRIBUTES
from covidseg.inference.dicom_seg import SERIES_DESCRIPTION
from covidseg.inference.predict import read_csv

from helpers import FAST_PREDICT_FLAGS, grey_array, invoke_predict, make_lung_head_model, write_dicom

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11"
IDENTIFIERS = {  # what the film says about the patient and the site beyond what a SEG needs
    "InstitutionName": "St Example Hospital",
    "OperatorsName": "Tech^Alice",
    "PatientAddress": "1 High Street",
    "OtherPatientIDs": "MRN-998",
    "PerformingPhysicianName": "Dr^Bob",
}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A tiny U-Net with a lung head whose (scaled-up) outputs give masks with both classes, and a code hash."""
    return make_lung_head_model(tmp_path / "model.pt", provenance={"code_hash": "c0ffee" * 4})


def film(path: Path, uid: str, **attrs) -> Path:
    full = {
        "PatientName": "Doe^Jane",
        "PatientID": "P123",
        "PatientBirthDate": "19700101",
        "PatientSex": "F",
        "StudyInstanceUID": STUDY,
        "SeriesInstanceUID": SERIES,
        "StudyDate": "20261201",
        "StudyTime": "101500",
        "StudyID": "S1",
        "AccessionNumber": "A42",
        "ReferringPhysicianName": "Dr^Who",
        "SOPInstanceUID": uid,
        **attrs,
    }
    return write_dicom(path, grey_array(60, 50, seed=7), **{k: v for k, v in full.items() if v is not None})


def predict(tmp_path: Path, model: Path, *inputs: Path, flags=()) -> tuple[object, dict, Path]:
    out = tmp_path / "out"
    result = invoke_predict(*inputs, "--model", model, "--out", out, "--dicom-seg", *flags, *FAST_PREDICT_FLAGS)
    return result, {r["stem"]: r for r in read_csv(out / "predictions.csv")}, out


def test_each_dicom_film_gets_a_seg_that_references_it_and_decodes_to_the_png_masks(tmp_path, model):
    uid = "1.2.826.0.1.3680043.8.498.21"
    png = tmp_path / "plain.png"
    Image.fromarray(grey_array(60, 50, seed=7)).save(png)
    result, rows, out = predict(tmp_path, model, film(tmp_path / "chest.dcm", uid), png)
    assert result.exit_code == 0, result.output
    assert not (out / "seg" / "plain.dcm").exists()  # no DICOM source: nothing to reference
    seg = hd.seg.segread(out / "seg" / "chest.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.StudyInstanceUID == STUDY and seg.PatientID == "P123"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == SERIES
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == uid
    assert seg.SegmentationType == "BINARY" and seg.SeriesDescription == SERIES_DESCRIPTION
    assert "research use" in seg.SeriesDescription and "not a medical device" in seg.SeriesDescription
    labels = {d.SegmentNumber: d for d in seg.SegmentSequence}
    assert labels[1].SegmentLabel == "COVID-19 infection" and labels[2].SegmentLabel == "lungs"
    assert labels[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SNOMED CT: Lesion
    assert labels[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SNOMED CT: Lung
    algorithm = labels[1].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "covidseg" and algorithm.AlgorithmVersion == __version__
    assert "c0ffee" in algorithm.AlgorithmParameters and "model.pt" in algorithm.AlgorithmParameters
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=[1, 2])[0]
    infection = np.asarray(Image.open(out / "masks" / "chest.png")) > 0
    lungs = np.asarray(Image.open(out / "lungs" / "chest.png")) > 0
    assert pixels.shape == (50, 60, 2) and 0 < infection.mean() < 1 and lungs.any()
    np.testing.assert_array_equal(pixels[..., 0] > 0, infection)
    np.testing.assert_array_equal(pixels[..., 1] > 0, lungs)
    plain = dcmread(out / "seg" / "chest.dcm")  # pydicom alone reads it too: 2 frames, one per segment
    assert plain.NumberOfFrames == 2 and plain.Rows == 50 and plain.Columns == 60
    assert rows["chest"]["status"] == "ok"


def test_a_film_without_the_optional_patient_and_study_attributes_still_gets_a_seg(tmp_path, model):
    lacking = dict.fromkeys(
        ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime"), None
    )
    result, rows, out = predict(tmp_path, model, film(tmp_path / "bare.dcm", "1.2.826.0.1.3680043.8.498.22", **lacking))
    assert result.exit_code == 0, result.output
    seg = dcmread(out / "seg" / "bare.dcm")
    for keyword in lacking:
        assert keyword in seg and not seg[keyword].value  # Type 2: present and empty
    assert seg.PatientName == "Doe^Jane"


def test_the_seg_carries_no_identifier_beyond_what_referencing_needs(tmp_path, model):
    source = film(tmp_path / "full.dcm", "1.2.826.0.1.3680043.8.498.23", **IDENTIFIERS)
    ds = dcmread(source)
    ds.add_new(0x00091010, "LO", "private vendor note")
    ds.save_as(source, enforce_file_format=True)
    result, rows, out = predict(tmp_path, model, source)
    assert result.exit_code == 0, result.output
    seg = dcmread(out / "seg" / "full.dcm")
    for keyword in IDENTIFIERS:
        assert keyword not in seg, keyword
    assert not any(e.tag.is_private for e in seg)
    copied = {k: str(seg[k].value) for k in PATIENT_STUDY_ATTRIBUTES}
    assert copied == {k: str(ds[k].value) for k in PATIENT_STUDY_ATTRIBUTES}  # exactly the required ones


def test_the_same_film_and_model_give_the_same_seg_instance(tmp_path, model):
    source = film(tmp_path / "again.dcm", "1.2.826.0.1.3680043.8.498.24")
    first = predict(tmp_path, model, source)[2] / "seg" / "again.dcm"
    uid_a, series_a = dcmread(first).SOPInstanceUID, dcmread(first).SeriesInstanceUID
    second = predict(tmp_path, model, source)[2] / "seg" / "again.dcm"
    assert (dcmread(second).SOPInstanceUID, dcmread(second).SeriesInstanceUID) == (uid_a, series_a)
    assert uid_a != "1.2.826.0.1.3680043.8.498.24" and series_a != SERIES


def test_id_sop_uid_names_rows_and_outputs_by_the_uid_and_writes_no_path(tmp_path, model):
    uid = "1.2.826.0.1.3680043.8.498.25"
    named = film(tmp_path / "Doe_Jane_chest.dcm", uid)
    png = tmp_path / "Doe_Jane_other.png"
    Image.fromarray(grey_array(60, 50, seed=7)).save(png)
    result, rows, out = predict(tmp_path, model, named, png, flags=("--id", "sop-uid"))
    assert result.exit_code == 1  # the PNG has no UID: an error row
    assert rows[uid]["status"] == "ok" and rows[uid]["input"] == uid
    assert (out / "masks" / f"{uid}.png").is_file() and (out / "seg" / f"{uid}.dcm").is_file()
    assert rows["input-2"]["status"] == "error" and "no valid SOP Instance UID" in rows["input-2"]["error"]
    table = (out / "predictions.csv").read_text()
    assert "Doe_Jane" not in table
    assert not any("Doe_Jane" in p.name for p in out.rglob("*"))


def test_id_sop_uid_refuses_a_uid_that_is_not_one_and_keeps_paths_out_of_warnings(tmp_path, model):
    evil = film(tmp_path / "Doe_Jane_evil.dcm", "1.2.3")
    ds = dcmread(evil)
    ds.SOPInstanceUID = "../../escaped"  # not a UID: never a file name
    ds.save_as(evil, enforce_file_format=True)
    flat = write_dicom(
        tmp_path / "Doe_Jane_flat.dcm", np.full((50, 60), 120, np.uint8), SOPInstanceUID="1.2.826.0.1.3680043.8.498.26"
    )
    result, rows, out = predict(tmp_path, model, evil, flat, flags=("--id", "sop-uid"))
    assert rows["input-1"]["status"] == "error" and "no valid SOP Instance UID" in rows["input-1"]["error"]
    assert not (tmp_path / "escaped.png").exists() and not list(tmp_path.glob("**/escaped*"))
    flat_row = rows["1.2.826.0.1.3680043.8.498.26"]
    assert "almost no contrast" in flat_row["warning"] and "Doe_Jane" not in (out / "predictions.csv").read_text()


def test_a_non_ascii_patient_name_keeps_its_character_set(tmp_path, model):
    source = film(tmp_path / "name.dcm", "1.2.826.0.1.3680043.8.498.27", SpecificCharacterSet="ISO_IR 100")
    ds = dcmread(source)
    ds.PatientName = "Müller^Jürgen"
    ds.save_as(source, enforce_file_format=True)
    result, rows, out = predict(tmp_path, model, source)
    assert result.exit_code == 0, result.output
    seg = dcmread(out / "seg" / "name.dcm")
    assert seg.SpecificCharacterSet == "ISO_IR 100" and str(seg.PatientName) == "Müller^Jürgen"


def test_another_threshold_gives_another_seg_instance(tmp_path, model):
    source = film(tmp_path / "t.dcm", "1.2.826.0.1.3680043.8.498.28")
    first = dcmread(predict(tmp_path, model, source)[2] / "seg" / "t.dcm").SOPInstanceUID
    second = dcmread(predict(tmp_path, model, source, flags=("--threshold", "0.3"))[2] / "seg" / "t.dcm")
    assert second.SOPInstanceUID != first
