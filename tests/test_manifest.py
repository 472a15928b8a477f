"""A user's own annotated films as data.source: a CSV manifest or a MONAI datalist, checked, extracted, split,
prepared, trained on (lung head from the films with lung masks only) and scored (severity only with lungs)."""

from __future__ import annotations

import csv
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from covidseg.check import check
from covidseg.cli import app
from covidseg.data.arrays import load_split, lung_flags
from covidseg.data.dicom import decode_dicom
from covidseg.data.extract import extract
from covidseg.data.layout import case_ids
from covidseg.data.manifest import ManifestError, seeded_splits
from covidseg.data.preprocess import preprocess
from covidseg.data.sources import SourceError, open_source
from covidseg.evaluation.external import evaluate_external
from covidseg.model.checkpoint import load_model
from covidseg.model.losses import segmentation_loss
from covidseg.params import DataParams, PreprocessParams

from conftest import dvc, set_params
from helpers import (
    TINY_SIZE,
    capture_logs,
    make_lung_head_model,
    make_manifest_dataset,
    read_csv_rows,
    train_tiny,
    write_manifest_csv,
    write_png,
)


def _extract(source: Path, out: Path, **params) -> dict:
    report = extract(source, out / "extracted", out / "data.json", DataParams(source=str(source), **params))
    return {
        "report": report,
        "rows": read_csv_rows(out / "extracted" / "manifest.csv"),
        "skipped": read_csv_rows(out / "extracted" / "skipped.csv"),
        "source": json.loads((out / "extracted" / "source.json").read_text()),
    }


@pytest.fixture
def films(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A flat folder with 9 films (3 DICOM), masks 0/255 and 0/1, lung masks for the even films only."""
    base = tmp_path / "my films"
    return base, make_manifest_dataset(base)


def test_a_csv_manifest_with_other_names_dicom_films_and_defects_is_extracted(tmp_path, films):
    base, rows = films
    big = np.zeros((2 * TINY_SIZE, 2 * TINY_SIZE), np.uint8)
    big[16:32, 12:28] = 255  # film 1's infection mask at twice the film's size: 8x8 of 32x32 after resizing
    write_png(base / rows[0]["mask"], big)
    rows[3]["mask"] = rows[3]["mask"].replace("/", "\\")  # a Windows path
    rows.append(dict(rows[1], split="test", patient="again"))  # film 2 listed again: a duplicate
    rows.append(dict(rows[2], image="films/nowhere.png", split="val"))  # a row pointing nowhere
    write_manifest_csv(base / "manifest.csv", rows)

    got = _extract(base, tmp_path / "out")
    assert got["report"].counts == {"train": 3, "val": 3, "test": 3}
    assert sorted((r["reason"], r["split"]) for r in got["skipped"]) == [
        ("duplicate", "test"),
        ("missing_image", "val"),
    ]
    missing = next(r for r in got["skipped"] if r["reason"] == "missing_image")
    assert "manifest.csv line 12" in missing["message"] and "films/nowhere.png" in missing["message"]
    by_image = {r["image_path"]: r for r in got["rows"]}
    first = by_image[rows[0]["image"]]
    assert first["id"] == "Patient 1 – film" and "resized:infection masks" in first["fixes"]
    assert float(first["infected_fraction"]) == pytest.approx(64 / TINY_SIZE**2)
    assert by_image[rows[1]["image"]]["fixes"] == "binarised:infection masks"  # its mask is 0/1
    assert float(by_image[rows[1]["image"]]["infected_fraction"]) == pytest.approx(64 / TINY_SIZE**2)
    # Films without a lung mask have empty lung fields and no lung member; the others have both.
    for r in got["rows"]:
        assert (r["lung_path"] == "") == (r["lung_sha256"] == "") == (r["lung_fraction"] == "")
    with zipfile.ZipFile(tmp_path / "out" / "extracted" / "subset.zip") as z:
        names = set(z.namelist())
        dicom = by_image["films/dicom ü 3.dcm"]
        assert dicom["member"] == "dicom ü 3.png" and "converted_mode:images" in dicom["fixes"]
        stored = np.asarray(Image.open(z.open(f"train/COVID-19/images/{dicom['member']}")))
    expected, _ = decode_dicom((base / "films/dicom ü 3.dcm").read_bytes(), "film")
    np.testing.assert_array_equal(stored, expected)
    for r in got["rows"]:
        assert (f"{r['split']}/COVID-19/lung masks/{r['member']}" in names) == (r["lung_path"] != "")
    assert got["source"]["split"] == "manifest"

    preprocess(tmp_path / "out" / "extracted", tmp_path / "prepared", PreprocessParams(image_size=TINY_SIZE))
    train = load_split(tmp_path / "prepared", "train")
    flags = lung_flags(train)
    assert flags.tolist() == [r["lung_path"] != "" for r in got["rows"] if r["split"] == "train"]
    assert not train["lungs"][~flags].any() and train["lungs"][flags].any()


def test_a_monai_datalist_extracts_exactly_what_the_same_csv_does(tmp_path, films):
    base, rows = films
    write_manifest_csv(base / "manifest.csv", rows)
    from_csv = _extract(base, tmp_path / "csv")
    (base / "manifest.csv").unlink()
    keys = {"train": "training", "val": "validation", "test": "test"}
    datalist: dict[str, list] = {k: [] for k in keys.values()}
    for r in rows:
        item = {"image": r["image"], "label": r["mask"]} | ({"lung": r["lung_mask"]} if r["lung_mask"] else {})
        datalist[keys[r["split"]]].append(item)
    (base / "datalist.json").write_text(json.dumps(datalist, ensure_ascii=False), encoding="utf-8")
    from_json = _extract(base, tmp_path / "json")
    assert from_json["rows"] == from_csv["rows"]
    a, b = (tmp_path / d / "extracted" / "subset.zip" for d in ("csv", "json"))
    assert a.read_bytes() == b.read_bytes()


def test_without_a_split_the_seeded_split_keeps_patients_together_and_is_recorded(tmp_path):
    base = tmp_path / "films"
    rows = make_manifest_dataset(base, per_split=10, split=False)
    for k, r in enumerate(rows):
        r["patient"] = f"patient {k // 2}"  # two films per patient
    write_manifest_csv(base / "manifest.csv", rows)
    got = _extract(base, tmp_path / "a", split_seed=3)
    assert got["source"] == {
        "name": "films",
        "split": "seeded",
        "split_seed": 3,
        "val_fraction": 0.16,
        "test_fraction": 0.2,
    }
    split_of = {r["image_path"]: r["split"] for r in got["rows"]}
    for k in range(0, len(rows), 2):
        assert split_of[rows[k]["image"]] == split_of[rows[k + 1]["image"]]
    counts = got["report"].counts
    assert counts == {"train": 20, "val": 4, "test": 6}  # 15 patients: round(2.4) val, 3 test, the rest train
    details = json.loads((tmp_path / "a" / "data_details.json").read_text())
    assert details["split"] == "seeded" and details["split_seed"] == 3

    write_manifest_csv(base / "manifest.csv", rows[::-1])  # row order does not move a film
    again = _extract(base, tmp_path / "b", split_seed=3)
    assert {r["image_path"]: r["split"] for r in again["rows"]} == split_of
    other = _extract(base, tmp_path / "c", split_seed=4)
    assert {r["image_path"]: r["split"] for r in other["rows"]} != split_of


def test_seeded_split_by_hand():
    from covidseg.data.manifest import Entry

    entries = [Entry(f"row {k}", f"f{k}.png", f"m{k}.png", "", "", "COVID-19", "") for k in range(10)]
    split = seeded_splits(entries, 0.2, 0.3, seed=0)
    order = np.random.default_rng(0).permutation(10)
    keys = sorted(e.image for e in entries)
    expected = {keys[i]: "test" if n < 3 else "val" if n < 5 else "train" for n, i in enumerate(order)}
    assert {e.image: e.split for e in split} == expected


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ("image,mask,lungs\na.png,b.png,c.png\n", "manifest.csv", "unknown column(s) ['lungs']"),
        ("image,lung_mask\na.png,c.png\n", "manifest.csv", "no 'mask' column"),
        ("image,mask,split\na.png,b.png,training set\n", "manifest.csv", "line 2: split 'training set'"),
        ("image,mask,class\na.png,b.png,Covid\n", "manifest.csv", "line 2: class 'Covid'"),
        ("image,mask,split\na.png,b.png,train\nc.png,d.png,\n", "manifest.csv", "line 3: no split"),
        ("image,mask\na.png,\n", "manifest.csv", "line 2: mask is empty"),
        ("image,mask\n", "manifest.csv", "lists no films"),
        ('{"training": ["a.png"]}', "datalist.json", "training[0]: expected an object"),
        ('{"training": [{"image": "a.png"', "datalist.json", "not valid JSON"),
        ('{"images": []}', "datalist.json", "expected a MONAI datalist"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_file_and_the_row(tmp_path, text, name, message):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        open_source(tmp_path)
    assert message in str(info.value) and str(tmp_path / name) in str(info.value)
    assert "\n" not in str(info.value)


def _check(tmp_path: Path, source: Path, **data) -> str:
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": {"source": str(source), **data}}))
    return check(params, tmp_path / "checked.txt", outs=())


def test_the_check_stage_refuses_what_the_pipeline_could_not_track_or_extract(tmp_path, films):
    base, rows = films
    write_manifest_csv(base / "manifest.csv", rows)
    assert "manifest.csv, 9 films of COVID-19" in _check(tmp_path, base)
    with pytest.raises(SourceError, match="names the manifest file, so DVC would hash only it"):
        _check(tmp_path, base / "manifest.csv")
    outside = tmp_path / "elsewhere.png"
    write_png(outside, np.zeros((TINY_SIZE, TINY_SIZE), np.uint8))
    write_manifest_csv(base / "manifest.csv", [*rows, dict(rows[0], image=str(outside), split="train")])
    with pytest.raises(SourceError, match="lie outside"):
        _check(tmp_path, base)
    (base / "films" / "notes.png").write_text("not a film")
    write_manifest_csv(base / "manifest.csv", [*rows, dict(rows[0], image="films/notes.png")])
    assert _check(tmp_path, base)  # under skip, one bad film leaves every split usable
    with pytest.raises(SourceError, match=r"notes\.png: not an image nor a DICOM file .*on_error is 'fail'"):
        _check(tmp_path, base, on_error="fail")
    (base / "films" / "notes.png").unlink()
    with pytest.raises(SourceError, match=r"line 11: image 'films/notes\.png' not found"):
        _check(tmp_path, base, on_error="fail")
    test_rows = [r for r in rows if r["split"] != "test"]
    write_manifest_csv(base / "manifest.csv", test_rows)
    with pytest.raises(SourceError, match="no usable COVID-19 films in split"):
        _check(tmp_path, base)


def test_the_lung_term_counts_only_the_films_with_a_lung_mask():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 2, 4, 4), (torch.rand(3, 2, 4, 4) > 0.5).float()
    mse = lambda p, t: ((p - t) ** 2).mean()  # noqa: E731 - a stand-in infection loss
    weight = torch.tensor([1.0, 0.0, 1.0])
    per_film = [F.binary_cross_entropy_with_logits(logits[i, 1], target[i, 1]) for i in (0, 2)]
    expected = mse(logits[:, :1], target[:, :1]) + 0.5 * (per_film[0] + per_film[1]) / 2
    assert segmentation_loss(logits, target, mse, 0.5, weight).item() == pytest.approx(expected.item(), rel=1e-6)
    everyone = segmentation_loss(logits, target, mse, 0.5, torch.ones(3))
    assert everyone.item() == pytest.approx(segmentation_loss(logits, target, mse, 0.5).item(), rel=1e-6)
    none = segmentation_loss(logits, target, mse, 0.5, torch.zeros(3))
    assert none.item() == pytest.approx(mse(logits[:, :1], target[:, :1]).item(), rel=1e-6)


def test_films_without_lung_masks_teach_the_lung_head_nothing(tmp_path, films, caplog):
    base, rows = films
    write_manifest_csv(base / "manifest.csv", rows)
    _extract(base, tmp_path / "out")
    prepared = tmp_path / "prepared"
    preprocess(tmp_path / "out" / "extracted", prepared, PreprocessParams(image_size=TINY_SIZE))
    capture_logs(caplog, logging.INFO)
    train_tiny(prepared, tmp_path / "partial")
    assert "1 of 3 training films have a lung mask" in caplog.text
    assert load_model(tmp_path / "partial" / "model.pt")[0].head.out_channels == 2

    write_manifest_csv(base / "manifest.csv", [dict(r, lung_mask="") for r in rows])
    _extract(base, tmp_path / "none")
    preprocess(tmp_path / "none" / "extracted", tmp_path / "prepared-none", PreprocessParams(image_size=TINY_SIZE))
    caplog.clear()
    train_tiny(tmp_path / "prepared-none", tmp_path / "no-lungs")
    assert "no training film has a lung mask, so the lung head is off" in caplog.text
    assert load_model(tmp_path / "no-lungs" / "model.pt")[0].head.out_channels == 1


def test_covidseg_evaluate_on_a_manifest_scores_every_film_and_severity_only_with_lungs(tmp_path, films):
    base, rows = films
    write_manifest_csv(base / "manifest.csv", [{k: v for k, v in r.items() if k != "split"} for r in rows])
    model = make_lung_head_model(tmp_path / "model.pt")
    summary = evaluate_external(model, base / "manifest.csv", tmp_path / "ev")
    assert summary["n_images"] == 9  # no split column: every film is scored, none held back for training
    severity = summary["severity"]
    assert severity["films_with_lung_mask"] == 4 and severity["films_without_lung_mask"] == 5
    with open(tmp_path / "ev" / "curves" / "severity.csv", newline="", encoding="utf-8") as f:
        per = {r["image"]: r for r in csv.DictReader(f)}
    with_lungs = {Path(r["image"]).stem for r in rows if r["lung_mask"]}
    assert len(per) == 9
    for image, r in per.items():
        assert (r["severity_note"] == "") == (image in with_lungs)
        assert (r["true_right_pct"] == "") == (image not in with_lungs)  # empty, never 0

    write_manifest_csv(base / "manifest.csv", [dict(r, lung_mask="") for r in rows])
    summary = evaluate_external(model, base, tmp_path / "ev2", split="test")
    assert summary["n_images"] == 3 and "no scored film has a lung mask" in summary["severity"]["model"]["error"]
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["share_mae"] is None  # empty, never 0


def test_dvc_reruns_extract_when_a_listed_film_changes_in_place(tiny_repo, tmp_path, films):
    base, rows = films
    write_manifest_csv(base / "manifest.csv", rows)
    set_params(tiny_repo, {"data": {"source": str(base)}})
    dvc(tiny_repo, "repro", "extract")
    assert "up to date" in dvc(tiny_repo, "status", "extract").stdout
    film = base / rows[4]["image"]
    pixels = np.asarray(Image.open(film)).copy()
    pixels[0, 0] ^= 1
    write_png(film, pixels)
    status = dvc(tiny_repo, "status", "extract").stdout
    assert "changed deps" in status and str(base) in status


def test_export_nnunet_from_a_manifest_keeps_the_pipelines_seeded_split(tmp_path):
    base = tmp_path / "films"
    rows = make_manifest_dataset(base, per_split=6, split=False)
    write_manifest_csv(base / "manifest.csv", rows)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": {"source": "unused", "split_seed": 9}}))
    result = CliRunner().invoke(app, ["export-nnunet", str(base), str(tmp_path / "nn"), "--params", str(params)])
    assert result.exit_code == 0, result.output
    ours = _extract(base, tmp_path / "ours", split_seed=9)
    folds = json.loads(next((tmp_path / "nn" / "nnUNet_preprocessed").glob("*/splits_final.json")).read_text())
    by_split = {s: sorted(r["id"] for r in ours["rows"] if r["split"] == s) for s in ("train", "val")}
    to_case = dict(zip((r["id"] for r in ours["rows"]), case_ids(ours["rows"])))
    assert sorted(folds[0]["train"]) == sorted(to_case[i] for i in by_split["train"])
    assert sorted(folds[0]["val"]) == sorted(to_case[i] for i in by_split["val"])
