"""preprocess(): extracted subset -> per-split arrays, decoded once, atomic on failure."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidseg.data.arrays import load_source, load_split, resize_mask
from covidseg.data.contrast import normalise_contrast
from covidseg.data.extract import extract
from covidseg.data.preprocess import preprocess
from covidseg.params import DataParams, PreprocessParams

from helpers import KAGGLE_NEST, dev_part_files, make_kaggle_dataset, read_csv_rows, snapshot_files, write_png

SPLITS = ("train", "val", "test")


def extracted(tmp_path: Path, src: Path, classes=("COVID-19",)) -> Path:
    out = tmp_path / "extracted"
    extract(src, out, tmp_path / "data.json", DataParams(source=str(src), classes=classes))
    return out


def test_arrays_match_sources_at_native_size(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=2, negatives=1)
    ext = extracted(tmp_path, tmp_path / "src", classes=("COVID-19", "Normal"))
    counts = preprocess(ext, tmp_path / "prepared", PreprocessParams(image_size=32))
    assert counts == {"train": 3, "val": 3, "test": 3}
    rows = read_csv_rows(ext / "manifest.csv")
    for split in SPLITS:
        d = load_split(tmp_path / "prepared", split)
        split_rows = [r for r in rows if r["split"] == split]
        assert d["images"].shape == d["masks"].shape == d["lungs"].shape == (3, 1, 32, 32)
        assert d["images"].dtype == d["masks"].dtype == np.uint8
        assert list(d["ids"]) == [r["id"] for r in split_rows]
        assert list(d["classes"]) == [r["class"] for r in split_rows]
        for i, r in enumerate(split_rows):
            np.testing.assert_array_equal(d["images"][i, 0], np.asarray(Image.open(tmp_path / "src" / r["image_path"])))
            np.testing.assert_array_equal(
                d["masks"][i, 0], np.asarray(Image.open(tmp_path / "src" / r["infection_path"])) // 255
            )
            np.testing.assert_array_equal(
                d["lungs"][i, 0], np.asarray(Image.open(tmp_path / "src" / r["lung_path"])) // 255
            )
        normal = d["classes"] == "Normal"
        assert normal.sum() == 1 and d["masks"][normal].sum() == 0 and d["masks"][~normal].sum() > 0
    assert root.is_dir()


def test_resized_masks_stay_binary(tmp_path: Path) -> None:
    make_kaggle_dataset(tmp_path / "src", per_split=1)
    ext = extracted(tmp_path, tmp_path / "src")
    preprocess(ext, tmp_path / "prepared", PreprocessParams(image_size=64))
    d = load_split(tmp_path / "prepared", "train")
    assert d["images"].shape == (1, 1, 64, 64)
    assert set(np.unique(d["masks"])) == {0, 1} and set(np.unique(d["lungs"])) == {0, 1}
    # The 8x8 infected block at 32 px covers 16x16 = 256 pixels at 64 px.
    assert d["masks"].sum() == 256


def test_resize_mask_thresholds_at_half() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = 255
    assert resize_mask(mask, 4).tolist() == (mask // 255).tolist()
    small = resize_mask(mask, 2)
    assert small.dtype == np.uint8 and small.tolist() == [[1, 0], [1, 0]]


def test_failure_keeps_previous_prepared(tmp_path: Path) -> None:
    make_kaggle_dataset(tmp_path / "src", per_split=1)
    ext = extracted(tmp_path, tmp_path / "src")
    preprocess(ext, tmp_path / "prepared", PreprocessParams(image_size=32))
    before = snapshot_files(tmp_path / "prepared")
    # Drop one member from subset.zip: the manifest now names a file that is not there.
    with zipfile.ZipFile(ext / "subset.zip") as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(ext / "subset.zip", "w") as z:
        for n, data in members.items():
            if n != "test/COVID-19/lung masks/covid_3.png":
                z.writestr(n, data)
    with pytest.raises(
        ValueError, match=r"subset\.zip: test/COVID-19/\.\.\./covid_3\.png listed in manifest\.csv cannot be read"
    ):
        preprocess(ext, tmp_path / "prepared", PreprocessParams(image_size=32))
    assert snapshot_files(tmp_path / "prepared") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_extract_output_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.csv: not found; run the extract stage first"):
        preprocess(tmp_path / "nothing", tmp_path / "prepared", PreprocessParams())


def test_partial_dev_set_round_trip(dev_data: Path, tmp_path: Path) -> None:
    files = dev_part_files(dev_data, classes=("COVID-19",), per_split=3)
    folder = tmp_path / "src"
    for rel, p in files.items():
        (folder / KAGGLE_NEST / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / KAGGLE_NEST / rel).write_bytes(p.read_bytes())
    ext = extracted(tmp_path, folder)
    assert preprocess(ext, tmp_path / "prepared", PreprocessParams(image_size=256)) == {"train": 3, "val": 3, "test": 3}
    d = load_split(tmp_path / "prepared", "val")
    first = sorted(p.name for p in (dev_data / KAGGLE_NEST / "Val/COVID-19/images").iterdir())[0]
    np.testing.assert_array_equal(
        d["images"][0, 0], np.asarray(Image.open(dev_data / KAGGLE_NEST / "Val/COVID-19/images" / first))
    )
    fraction = d["masks"][0, 0].mean()
    row = next(r for r in read_csv_rows(ext / "manifest.csv") if r["split"] == "val")
    assert fraction == pytest.approx(float(row["infected_fraction"]), abs=1e-6) and fraction > 0
    preprocess(ext, tmp_path / "p128", PreprocessParams(image_size=128))
    assert load_split(tmp_path / "p128", "val")["images"].shape == (3, 1, 128, 128)


def test_extract_rewrites_odd_files_so_preprocess_reads_grey(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=1)
    grey = np.asarray(Image.open(root / "Train/COVID-19/images/covid_1.png"))
    write_png(root / "Train/COVID-19/images/covid_1.png", np.stack([grey] * 3, axis=-1))
    ext = extracted(tmp_path, tmp_path / "src")
    preprocess(ext, tmp_path / "prepared", PreprocessParams(image_size=32))
    np.testing.assert_array_equal(load_split(tmp_path / "prepared", "train")["images"][0, 0], grey)
    assert KAGGLE_NEST in read_csv_rows(ext / "manifest.csv")[0]["image_path"]


@pytest.mark.parametrize("method", ["clahe", "equalize"])
def test_contrast_changes_the_images_only_and_is_recorded(tmp_path: Path, method: str) -> None:
    make_kaggle_dataset(tmp_path / "src", per_split=2, negatives=1)
    ext = extracted(tmp_path, tmp_path / "src", classes=("COVID-19", "Normal"))
    preprocess(ext, tmp_path / "plain", PreprocessParams(image_size=64))
    preprocess(ext, tmp_path / "normed", PreprocessParams(image_size=64, contrast=method))
    assert json.loads((tmp_path / "plain" / "source.json").read_text())["contrast"] == "none"
    assert json.loads((tmp_path / "normed" / "source.json").read_text())["contrast"] == method
    assert load_source(tmp_path / "normed")["contrast"] == method
    for split in SPLITS:
        plain, normed = load_split(tmp_path / "plain", split), load_split(tmp_path / "normed", split)
        assert not np.array_equal(plain["images"], normed["images"])
        np.testing.assert_array_equal(normed["images"][:, 0], normalise_contrast(plain["images"][:, 0], method))
        for key in ("masks", "lungs", "ids", "classes"):
            np.testing.assert_array_equal(plain[key], normed[key])
