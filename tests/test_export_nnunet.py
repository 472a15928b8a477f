"""`covidseg export-nnunet`: an nnU-Net v2 raw dataset in the documented format (dataset_format.md), from the
same extracted films, with covidseg's own train/val split as fold 0 (no nnU-Net needed)."""

from __future__ import annotations

import csv
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.export.nnunet import NnunetExportError, export_nnunet

from helpers import make_kaggle_dataset

runner = CliRunner()


def case(manifest_id: str) -> str:
    """The documented case identifier of a manifest id: other characters than letters, digits, _ and - become _."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", manifest_id)


def _manifest(extracted: Path) -> list[dict]:
    with open(extracted / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_dataset_follows_nnunets_documented_format_and_keeps_the_split(tmp_path, tiny_prepared):
    extracted = tiny_prepared.parent / "extracted"
    summary = export_nnunet(extracted, tmp_path / "nn", dataset_id=502, name="Tiny")
    raw = tmp_path / "nn" / "nnUNet_raw" / "Dataset502_Tiny"
    assert summary["dataset"] == "Dataset502_Tiny"
    dataset = json.loads((raw / "dataset.json").read_text())
    # The required keys of dataset.json: channel_names (id -> name), labels (name -> consecutive ints from
    # background 0), numTraining, file_ending.
    assert dataset["channel_names"] == {"0": "X-ray"}
    assert dataset["labels"] == {"background": 0, "infection": 1}
    assert dataset["file_ending"] == ".png"
    images = sorted(p.name for p in (raw / "imagesTr").iterdir())
    labels = sorted(p.name for p in (raw / "labelsTr").iterdir())
    assert all(n.endswith("_0000.png") for n in images)  # case_identifier_XXXX.png, one channel
    cases = [n[: -len("_0000.png")] for n in images]
    assert sorted(f"{c}.png" for c in cases) == labels and dataset["numTraining"] == len(cases)
    rows = _manifest(extracted)
    by_split = {s: sorted(case(r["id"]) for r in rows if r["split"] == s) for s in ("train", "val", "test")}
    assert sorted(cases) == sorted(by_split["train"] + by_split["val"])
    assert sorted(p.name[: -len("_0000.png")] for p in (raw / "imagesTs").iterdir()) == by_split["test"]
    splits = json.loads((tmp_path / "nn" / "nnUNet_preprocessed" / "Dataset502_Tiny" / "splits_final.json").read_text())
    assert len(splits) == 1 and sorted(splits[0]["train"]) == by_split["train"]
    assert sorted(splits[0]["val"]) == by_split["val"]  # fold 0 is covidseg's own split
    with zipfile.ZipFile(extracted / "subset.zip") as z:
        for r in rows:
            base, name = f"{r['split']}/{r['class']}", Path(r["image_path"]).name
            truth = np.asarray(Image.open(z.open(f"{base}/infection masks/{name}")).convert("L")) >= 128
            film = np.asarray(Image.open(z.open(f"{base}/images/{name}")).convert("L"))
            where = "imagesTr" if r["split"] != "test" else "imagesTs"
            np.testing.assert_array_equal(np.asarray(Image.open(raw / where / f"{case(r['id'])}_0000.png")), film)
            if r["split"] == "test":
                label = (
                    np.asarray(Image.open(tmp_path / "nn" / "test_labels" / "Dataset502_Tiny" / f"{case(r['id'])}.png"))
                    == 255
                )
            else:
                label = np.asarray(Image.open(raw / "labelsTr" / f"{case(r['id'])}.png"))
                assert set(np.unique(label)) <= {0, 1} and label.dtype == np.uint8
            np.testing.assert_array_equal(label.astype(bool), truth)


def test_a_kaggle_source_is_extracted_first_through_the_cli(tmp_path, monkeypatch):
    source = make_kaggle_dataset(tmp_path / "kaggle", per_split=2)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the default data section
    result = runner.invoke(app, ["export-nnunet", str(tmp_path / "kaggle"), str(tmp_path / "nn")])
    assert result.exit_code == 0, result.output
    raw = tmp_path / "nn" / "nnUNet_raw" / "Dataset501_COVIDQUEx"
    assert len(list((raw / "imagesTr").iterdir())) == 4 and len(list((raw / "imagesTs").iterdir())) == 2
    assert "fold 0" in result.stdout and source.is_dir()


def test_bad_inputs_are_refused_by_name(tmp_path, tiny_prepared):
    with pytest.raises(NnunetExportError, match=r"manifest\.csv: not found"):
        export_nnunet(tmp_path / "nothing", tmp_path / "nn")
    with pytest.raises(NnunetExportError, match="1-999"):
        export_nnunet(tiny_prepared.parent / "extracted", tmp_path / "nn", dataset_id=1000)
    result = runner.invoke(app, ["export-nnunet", str(tmp_path / "nothing"), str(tmp_path / "nn")])
    assert result.exit_code == 2 and "nothing" in result.output


def test_a_re_export_keeps_what_nnunet_wrote_beside_the_split(tmp_path, tiny_prepared):
    extracted = tiny_prepared.parent / "extracted"
    export_nnunet(extracted, tmp_path / "nn")
    pre = tmp_path / "nn" / "nnUNet_preprocessed" / "Dataset501_COVIDQUEx"
    (pre / "nnUNetPlans.json").write_text("{}")  # as nnUNetv2_plan_and_preprocess leaves it
    export_nnunet(extracted, tmp_path / "nn")
    assert (pre / "nnUNetPlans.json").is_file() and (pre / "splits_final.json").is_file()
