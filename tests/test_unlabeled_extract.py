"""data.unlabeled: the archive's Lung Segmentation Data COVID-19 films, matched to the labelled films by pixels."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidseg.data.extract import ExtractError, extract
from covidseg.data.preprocess import preprocess
from covidseg.data.sources import SourceError
from covidseg.data.synth import synthesize
from covidseg.params import DataParams, ParamsError, PreprocessParams, SynthParams, validate_all

from conftest import REPO, set_params

LUNG_ROOT = "Lung Segmentation Data/Lung Segmentation Data"
SYNTH = SynthParams(train=4, val=2, test=2, negatives=1, image_size=32, unlabeled=5)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive") / "raw"
    synthesize(root, SYNTH, seed=3)
    return root


def _extract(source: Path, out: Path, unlabeled: bool = True, **extra) -> tuple[dict, Path]:
    params = DataParams(source=str(source), classes=("COVID-19", "Normal"), unlabeled=unlabeled, **extra)
    extract(source, out / "extracted", out / "data.json", params, workers=1)
    return json.loads((out / "data_details.json").read_text()), out / "extracted"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_synthetic_archive_has_the_lung_half_in_the_kaggle_layout(archive):
    lung = archive / LUNG_ROOT
    for split in ("Train", "Val", "Test"):
        for kind in ("images", "lung masks"):
            assert sorted(p.name for p in (lung / split / "COVID-19" / kind).glob("*.png"))
        assert not (lung / split / "COVID-19" / "infection masks").exists()
    covid = sum(len(list((lung / s / "COVID-19" / "images").glob("*.png"))) for s in ("Train", "Val", "Test"))
    assert covid == SYNTH.train + SYNTH.val + SYNTH.test + SYNTH.unlabeled
    # the infection half's films are there again, under other names
    first = archive / "Infection Segmentation Data/Infection Segmentation Data/Val/COVID-19/images"
    film = np.asarray(Image.open(sorted(first.glob("*.png"))[0]))
    twins = [p for p in lung.rglob("images/*.png") if np.array_equal(np.asarray(Image.open(p)), film)]
    assert len(twins) == 1 and twins[0].name != sorted(first.glob("*.png"))[0].name


def test_films_equal_to_a_labelled_film_are_left_out_by_pixels(archive, tmp_path):
    details, extracted = _extract(archive, tmp_path)
    rows = _rows(extracted / "unlabeled.csv")
    assert len(rows) == SYNTH.unlabeled
    u = details["unlabeled"]
    assert u["found"] == SYNTH.train + SYNTH.val + SYNTH.test + SYNTH.unlabeled and u["kept"] == SYNTH.unlabeled
    assert u["same_as_labelled_by_split"] == {"train": SYNTH.train, "val": SYNTH.val, "test": SYNTH.test}
    assert json.loads((tmp_path / "data.json").read_text())["unlabeled_images"] == SYNTH.unlabeled
    labelled = {
        np.asarray(Image.open(p)).tobytes() for p in (archive / "Infection Segmentation Data").rglob("images/*.png")
    }
    with zipfile.ZipFile(extracted / "unlabeled.zip") as z:
        names = sorted(z.namelist())
        assert names == sorted([f"images/{r['member']}" for r in rows] + [f"lung masks/{r['member']}" for r in rows])
        for r in rows:
            pixels = np.asarray(Image.open(z.open(f"images/{r['member']}")))
            assert pixels.tobytes() not in labelled
            assert set(np.unique(np.asarray(Image.open(z.open(f"lung masks/{r['member']}"))))) <= {0, 255}


def test_without_data_unlabeled_the_outputs_are_byte_identical_and_nothing_more(archive, tmp_path):
    _, with_u = _extract(archive, tmp_path / "with")
    _, without = _extract(archive, tmp_path / "without", unlabeled=False)
    assert sorted(p.name for p in without.iterdir()) == sorted(
        p.name for p in with_u.iterdir() if not p.name.startswith("unlabeled")
    )
    for name in ("manifest.csv", "subset.zip", "skipped.csv"):
        assert (with_u / name).read_bytes() == (without / name).read_bytes()
    assert "unlabeled_images" not in json.loads((tmp_path / "without" / "data.json").read_text())


def test_a_zip_archive_gives_the_same_unlabeled_films(archive, tmp_path):
    zipped = tmp_path / "covidqu.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for p in sorted(archive.rglob("*.png")):
            z.write(p, "covidqu/" + p.relative_to(archive).as_posix())
    _, folder = _extract(archive, tmp_path / "folder")
    _, from_zip = _extract(zipped, tmp_path / "zip")
    assert (folder / "unlabeled.zip").read_bytes() == (from_zip / "unlabeled.zip").read_bytes()
    assert [r["image_sha256"] for r in _rows(folder / "unlabeled.csv")] == [
        r["image_sha256"] for r in _rows(from_zip / "unlabeled.csv")
    ]


def test_bad_unlabeled_films_are_skipped_and_counted(archive, tmp_path):
    source = tmp_path / "raw"
    shutil.copytree(archive, source)
    lung = source / LUNG_ROOT / "Train" / "COVID-19"
    extra = sorted((lung / "images").glob("covid_*.png"))
    own = [p for p in extra if int(p.stem.split("_")[1]) < 50000]  # the lung half's own films
    shutil.copy(own[0], lung / "images" / "covid_99.png")  # a second copy of an unlabeled film
    shutil.copy(lung / "lung masks" / own[0].name, lung / "lung masks" / "covid_99.png")
    (lung / "lung masks" / own[1].name).unlink()
    (lung / "images" / "covid_98.png").write_bytes(b"not a png")
    (lung / "lung masks" / "covid_98.png").write_bytes(b"not a png")
    details, extracted = _extract(source, tmp_path / "out")
    skipped = details["unlabeled"]["skipped"]
    assert skipped["duplicate"] == 1 and skipped["missing_lung_mask"] == 1 and skipped["unreadable"] == 1
    assert details["unlabeled"]["kept"] == SYNTH.unlabeled - 1
    assert len(_rows(extracted / "unlabeled.csv")) == SYNTH.unlabeled - 1


def test_a_source_without_the_lung_half_is_refused_by_name(archive, tmp_path):
    source = tmp_path / "raw"
    shutil.copytree(archive, source)
    shutil.rmtree(source / "Lung Segmentation Data")
    with pytest.raises(SourceError, match="data.unlabeled is true but there is no 'Lung Segmentation Data"):
        _extract(source, tmp_path / "out")
    assert not (tmp_path / "out" / "extracted").exists()


def test_preprocess_writes_the_unlabeled_films_only_when_extracted(archive, tmp_path):
    _, extracted = _extract(archive, tmp_path / "with")
    counts = preprocess(extracted, tmp_path / "prepared", PreprocessParams(image_size=32))
    with np.load(tmp_path / "prepared" / "unlabeled.npz") as z:
        assert sorted(z.files) == ["ids", "images", "lungs"]
        assert z["images"].shape == z["lungs"].shape == (SYNTH.unlabeled, 1, 32, 32)
        assert set(np.unique(z["lungs"])) <= {0, 1} and z["lungs"].any()
    source = json.loads((tmp_path / "prepared" / "source.json").read_text())
    assert source["unlabeled_count"] == SYNTH.unlabeled and "unlabeled" not in source["split_counts"]
    assert counts == {"train": SYNTH.train + 1, "val": SYNTH.val + 1, "test": SYNTH.test + 1}
    _, without = _extract(archive, tmp_path / "without", unlabeled=False)
    preprocess(without, tmp_path / "plain", PreprocessParams(image_size=32))
    assert not (tmp_path / "plain" / "unlabeled.npz").exists()
    for split in ("train", "val", "test"):
        assert (tmp_path / "plain" / f"{split}.npz").read_bytes() == (
            tmp_path / "prepared" / f"{split}.npz"
        ).read_bytes()


def test_archive_self_training_needs_data_unlabeled(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, {"train": {"unlabeled": "archive"}})
    with pytest.raises(ParamsError, match="needs data.unlabeled: true"):
        validate_all(tmp_path / "params.yaml")
    set_params(tmp_path, {"data": {"unlabeled": True}})
    assert validate_all(tmp_path / "params.yaml")["train"].unlabeled == "archive"


def test_a_manifest_source_with_data_unlabeled_is_refused(tmp_path):
    films = tmp_path / "films"
    films.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i + 10, np.uint8)).save(films / f"f{i}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255
        Image.fromarray(mask).save(films / f"m{i}.png")
    lines = ["image,mask,split"] + [f"f{i}.png,m{i}.png,{s}" for i, s in enumerate(("train", "val", "test"))]
    (films / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ExtractError, match="a manifest has none; set data.unlabeled: false"):
        _extract(films, tmp_path / "out")


def test_the_check_stage_counts_the_lung_half_or_refuses_a_source_without_it(archive, tmp_path):
    from covidseg.check import check

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, {"data": {"source": str(archive), "unlabeled": True}})
    found = check(tmp_path / "params.yaml", tmp_path / "checked.txt", [], tmp_path)
    assert found.endswith(
        f"; {SYNTH.train + SYNTH.val + SYNTH.test + SYNTH.unlabeled} unlabeled COVID-19 films in its lung half"
    )
    bare = tmp_path / "bare"
    shutil.copytree(archive / "Infection Segmentation Data", bare / "Infection Segmentation Data")
    set_params(tmp_path, {"data": {"source": str(bare)}})
    with pytest.raises(SourceError, match="no 'Lung Segmentation Data"):
        check(tmp_path / "params.yaml", tmp_path / "checked2.txt", [], tmp_path)
    assert not (tmp_path / "checked2.txt").exists()
