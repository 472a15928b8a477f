"""extract(): the checks and the skip/fail policy on generated malformed files, and the real dev set."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from covidseg import atomic
from covidseg.data import extract as extract_mod
from covidseg.data.extract import SKIP_REASONS, ExtractError, extract
from covidseg.params import DataParams

from helpers import (
    KAGGLE_NEST,
    KAGGLE_SPLIT_DIRS,
    TINY_SIZE,
    TRIPLET_KINDS,
    make_kaggle_dataset,
    read_csv_rows,
    snapshot_files,
    write_png,
    write_triplet,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixture writers


def run_extract(src: Path, work: Path, **params) -> extract_mod.ExtractReport:
    return extract(src, work / "extracted", work / "metrics" / "data.json", DataParams(source=str(src), **params))


def read_metrics(work: Path) -> dict:
    return json.loads((work / "metrics" / "data_details.json").read_text())


# ---------------------------------------------------------------- defects


def _truncate(root: Path) -> tuple[str, str, str]:
    p = write_triplet(root, "Train", "COVID-19", "covid_900.png", 900)["images"]
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return "train", "unreadable", "Train/COVID-19/images/covid_900.png"


def _not_png(root: Path) -> tuple[str, str, str]:
    p = write_triplet(root, "Val", "COVID-19", "covid_901.png", 901)["lung masks"]
    p.write_bytes(b"this is not an image")
    return "val", "unreadable", "Val/COVID-19/lung masks/covid_901.png"


def _no_mask(root: Path) -> tuple[str, str, str]:
    write_triplet(root, "Test", "COVID-19", "covid_902.png", 902)["infection masks"].unlink()
    return "test", "missing_mask", "Test/COVID-19/images/covid_902.png"


def _no_image(root: Path) -> tuple[str, str, str]:
    write_triplet(root, "Train", "COVID-19", "covid_903.png", 903)["images"].unlink()
    return "train", "missing_image", "Train/COVID-19/infection masks/covid_903.png"


def _no_lung(root: Path) -> tuple[str, str, str]:
    write_triplet(root, "Val", "COVID-19", "covid_904.png", 904)["lung masks"].unlink()
    return "val", "missing_lung_mask", "Val/COVID-19/images/covid_904.png"


def _size(root: Path) -> tuple[str, str, str]:
    p = write_triplet(root, "Test", "COVID-19", "covid_905.png", 905)["infection masks"]
    write_png(p, np.full((TINY_SIZE // 2, TINY_SIZE), 255, np.uint8))
    return "test", "size_mismatch", "Test/COVID-19/infection masks/covid_905.png is 32x16"


def _duplicate(root: Path) -> tuple[str, str, str]:
    # The pixels of train's covid_1 again in test, under another name (a leak across splits).
    for kind in TRIPLET_KINDS:
        dst = root / "Test" / "COVID-19" / kind / "covid_906.png"
        shutil.copy(root / "Train" / "COVID-19" / kind / "covid_1.png", dst)
    return (
        "test",
        "duplicate",
        "Test/COVID-19/images/covid_906.png: same pixels as the image already taken at train/COVID-19/covid_1.png",
    )


def _empty(root: Path) -> tuple[str, str, str]:
    write_triplet(root, "Val", "COVID-19", "covid_907.png", 907, infected=False)
    return "val", "empty_covid_mask", "Val/COVID-19/infection masks/covid_907.png: COVID-19 infection mask is empty"


DEFECTS = {
    "truncated": _truncate,
    "not_png": _not_png,
    "missing_mask": _no_mask,
    "missing_image": _no_image,
    "missing_lung": _no_lung,
    "size": _size,
    "duplicate": _duplicate,
    "empty_covid": _empty,
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_defect_is_skipped_and_reported(tmp_path: Path, defect: str) -> None:
    root = make_kaggle_dataset(tmp_path / "src")
    split, reason, fragment = DEFECTS[defect](root)
    report = run_extract(tmp_path / "src", tmp_path / "work", on_error="skip")
    metrics = read_metrics(tmp_path / "work")
    assert {s: metrics[s]["count"] for s in KAGGLE_SPLIT_DIRS} == {"train": 2, "val": 2, "test": 2}
    assert metrics[split]["skipped"][reason] == 1
    assert metrics["skipped_total"] == 1
    assert sum(v for s in KAGGLE_SPLIT_DIRS for v in metrics[s]["skipped"].values()) == 1
    (message,) = [m for m in report.messages if m.startswith("skipped")]
    assert fragment in message and f"skipped ({reason})" in message
    (row,) = read_csv_rows(tmp_path / "work" / "extracted" / "skipped.csv")
    assert (row["split"], row["reason"]) == (split, reason) and fragment in row["message"]
    names = {r["id"] for r in read_csv_rows(tmp_path / "work" / "extracted" / "manifest.csv")}
    assert names == {f"covid_{k}" for k in range(1, 7)}


@pytest.mark.parametrize("defect", DEFECTS)
def test_defect_fails_and_keeps_previous_outputs(tmp_path: Path, defect: str) -> None:
    root = make_kaggle_dataset(tmp_path / "src")
    work = tmp_path / "work"
    run_extract(tmp_path / "src", work, on_error="fail")
    before = snapshot_files(work)
    _, reason, fragment = DEFECTS[defect](root)
    with pytest.raises(ExtractError) as err:
        run_extract(tmp_path / "src", work, on_error="fail")
    assert fragment in str(err.value) and reason in str(err.value)
    assert snapshot_files(work) == before  # old outputs intact, no temporaries left behind


def test_nonempty_negative_mask(tmp_path: Path) -> None:
    make_kaggle_dataset(tmp_path / "src", negatives=1)
    write_triplet(tmp_path / "src" / KAGGLE_NEST, "Train", "Normal", "Normal (99).png", 99, infected=True)
    report = run_extract(tmp_path / "src", tmp_path / "w1", classes=("COVID-19", "Normal"))
    assert read_metrics(tmp_path / "w1")["train"]["skipped"]["nonempty_negative_mask"] == 1
    assert any(
        "Train/Normal/infection masks/Normal (99).png: Normal infection mask is not empty" in m for m in report.messages
    )
    with pytest.raises(ExtractError, match=r"Normal \(99\)\.png"):
        run_extract(tmp_path / "src", tmp_path / "w2", classes=("COVID-19", "Normal"), on_error="fail")


def test_classes_default_covid_only_and_negatives_optional(tmp_path: Path) -> None:
    make_kaggle_dataset(tmp_path / "src", per_split=2, negatives=1)
    run_extract(tmp_path / "src", tmp_path / "a")
    m = read_metrics(tmp_path / "a")
    assert [m[s]["count"] for s in KAGGLE_SPLIT_DIRS] == [2, 2, 2]
    assert m["train"]["classes"] == {"COVID-19": 2}
    run_extract(tmp_path / "src", tmp_path / "b", classes=("COVID-19", "Non-COVID", "Normal"))
    m = read_metrics(tmp_path / "b")
    assert [m[s]["count"] for s in KAGGLE_SPLIT_DIRS] == [4, 4, 4]
    assert m["val"]["classes"] == {"COVID-19": 2, "Non-COVID": 1, "Normal": 1}
    rows = read_csv_rows(tmp_path / "b" / "extracted" / "manifest.csv")
    negatives = [r for r in rows if r["class"] != "COVID-19"]
    assert len(negatives) == 6 and all(float(r["infected_fraction"]) == 0.0 for r in negatives)
    # Infected-fraction stats describe the COVID-19 pairs only: 64 of 1024 pixels each.
    assert m["test"]["infected_fraction_covid"] == {"mean": 0.0625, "median": 0.0625, "min": 0.0625, "max": 0.0625}


# ---------------------------------------------------------------- fixes (both policies)


def _rgb_image(root: Path):
    p = root / "Train/COVID-19/images/covid_1.png"
    grey = np.asarray(Image.open(p))
    write_png(p, np.stack([grey] * 3, axis=-1))  # RGB with R=G=B: converts back to the same grey
    return "images", "converted_mode", grey


def _rgba_mask(root: Path):
    p = root / "Train/COVID-19/infection masks/covid_1.png"
    grey = np.asarray(Image.open(p))
    write_png(p, np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    return "infection masks", "converted_mode", grey


def _sixteen_bit_image(root: Path):
    p = root / "Train/COVID-19/images/covid_1.png"
    grey = np.asarray(Image.open(p))
    Image.fromarray(grey.astype(np.uint16) * 257).save(p)  # I;16: 255 -> 65535
    assert Image.open(p).mode == "I;16"
    return "images", "converted_mode", grey


def _grey_levels_mask(root: Path):
    p = root / "Train/COVID-19/lung masks/covid_1.png"
    mask = np.asarray(Image.open(p)).copy()
    mask[0, :4] = [1, 127, 128, 254]  # outside the lung: 0, 0, 255, 255 after binarising at 0.5
    write_png(p, mask)
    expected = mask.copy()
    expected[0, :4] = [0, 0, 255, 255]
    return "lung masks", "binarised", expected


FIXES = {
    "rgb_image": _rgb_image,
    "rgba_mask": _rgba_mask,
    "sixteen_bit": _sixteen_bit_image,
    "grey_mask": _grey_levels_mask,
}


@pytest.mark.parametrize("on_error", ["skip", "fail"])
@pytest.mark.parametrize("fix", FIXES)
def test_fixable_files_are_converted_and_counted(tmp_path: Path, fix: str, on_error: str) -> None:
    root = make_kaggle_dataset(tmp_path / "src")
    untouched = (root / "Train/COVID-19/images/covid_2.png").read_bytes()
    kind, fix_kind, expected = FIXES[fix](root)
    report = run_extract(tmp_path / "src", tmp_path / "w", on_error=on_error)
    m = read_metrics(tmp_path / "w")
    assert m["train"]["count"] == 2 and m["skipped_total"] == 0
    assert m["train"]["fixed"][fix_kind] == 1
    assert sum(m[s]["fixed"][k] for s in KAGGLE_SPLIT_DIRS for k in m[s]["fixed"]) == 1
    assert any(f"Train/COVID-19/{kind}/covid_1.png" in msg for msg in report.messages if msg.startswith("fixed"))
    with zipfile.ZipFile(tmp_path / "w/extracted/subset.zip") as z:
        with Image.open(io.BytesIO(z.read(f"train/COVID-19/{kind}/covid_1.png"))) as img:
            assert img.mode == "L"
            np.testing.assert_array_equal(np.asarray(img), expected)
        assert z.read("train/COVID-19/images/covid_2.png") == untouched  # clean files are copied, not re-encoded
    row = next(r for r in read_csv_rows(tmp_path / "w/extracted/manifest.csv") if r["id"] == "covid_1")
    assert row["fixes"] == f"{fix_kind}:{kind}"


# ---------------------------------------------------------------- atomicity, record, determinism


def test_failure_after_metrics_are_ready_leaves_old_metrics(tmp_path: Path, monkeypatch) -> None:
    """The new data.json must not land beside old outputs when swapping in the new folder fails."""
    make_kaggle_dataset(tmp_path / "src")
    work = tmp_path / "work"
    run_extract(tmp_path / "src", work)
    before = snapshot_files(work)
    write_triplet(tmp_path / "src" / KAGGLE_NEST, "Train", "COVID-19", "covid_50.png", 50)  # new data: new metrics
    real_replace = os.replace

    def failing_replace(src, dst):  # the swap of the new folder for the old one fails
        if Path(dst).name == ".extracted.old":
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        run_extract(tmp_path / "src", work)
    monkeypatch.undo()
    after = snapshot_files(work)
    assert after == before


def test_no_usable_pairs_in_a_split_is_an_error(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=1)
    (root / "Test/COVID-19/infection masks/covid_3.png").unlink()
    with pytest.raises(ExtractError, match=r"no usable COVID-19 pairs in split\(s\) test.*covid_3\.png"):
        run_extract(tmp_path / "src", tmp_path / "w")
    assert not (tmp_path / "w" / "metrics" / "data.json").exists()
    assert not (tmp_path / "w" / "extracted").exists()


def test_manifest_records_sources_hashes_and_fractions(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src")
    run_extract(tmp_path / "src", tmp_path / "w")
    rows = read_csv_rows(tmp_path / "w/extracted/manifest.csv")
    assert list(rows[0]) == extract_mod.MANIFEST_FIELDS
    assert [r["split"] for r in rows] == ["train"] * 2 + ["val"] * 2 + ["test"] * 2
    r = rows[0]
    for kind, col in zip(TRIPLET_KINDS, ("image", "infection", "lung")):
        src = tmp_path / "src" / r[f"{col}_path"]
        assert src.is_file() and src.parent.name == kind
        assert hashlib.sha256(src.read_bytes()).hexdigest() == r[f"{col}_sha256"]
    assert (r["height"], r["width"]) == (str(TINY_SIZE), str(TINY_SIZE))
    assert float(r["infected_fraction"]) == pytest.approx(64 / 1024)
    assert float(r["lung_fraction"]) == pytest.approx((TINY_SIZE - 8) * (TINY_SIZE - 4) / TINY_SIZE**2, abs=1e-6)
    m = read_metrics(tmp_path / "w")
    assert set(m["train"]["skipped"]) == set(SKIP_REASONS)
    assert isinstance(m["train"]["count"], int)
    assert (root / "Train").is_dir()


def test_rerun_is_byte_identical_and_pool_matches_serial(tmp_path: Path, monkeypatch) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=3, negatives=1)
    _duplicate(root)
    _truncate(root)
    classes = ("COVID-19", "Non-COVID", "Normal")
    r1 = extract(tmp_path / "src", tmp_path / "a/x", tmp_path / "a/m.json", DataParams(classes=classes), workers=1)
    extract(tmp_path / "src", tmp_path / "b/x", tmp_path / "b/m.json", DataParams(classes=classes), workers=1)
    monkeypatch.setattr(extract_mod, "PARALLEL_MIN", 0)
    r2 = extract(tmp_path / "src", tmp_path / "c/x", tmp_path / "c/m.json", DataParams(classes=classes), workers=2)
    assert snapshot_files(tmp_path / "a") == snapshot_files(tmp_path / "b") == snapshot_files(tmp_path / "c")
    assert r1.messages == r2.messages and r1.skipped_total == 2
    with pytest.raises(ExtractError, match="covid_900.png"):
        extract(
            tmp_path / "src",
            tmp_path / "d/x",
            tmp_path / "d/m.json",
            DataParams(classes=classes, on_error="fail"),
            workers=2,
        )


def test_stage_script_reports_failure_and_keeps_outputs(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": str(tmp_path / "src"), "on_error": "fail"}}))
    cmd = [
        sys.executable,
        str(REPO / "stages/extract.py"),
        "--out",
        str(tmp_path / "w/extracted"),
        "--metrics",
        str(tmp_path / "w/data.json"),
        "--params",
        str(params),
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "'train': 2" in ok.stdout
    before = snapshot_files(tmp_path / "w")
    _size(root)
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "extract failed" in bad.stderr and "covid_905.png" in bad.stderr and "Traceback" not in bad.stderr
    assert "dvc checkout extract" in bad.stderr and "data_details.json" in bad.stderr  # how to restore under DVC
    assert snapshot_files(tmp_path / "w") == before


# ---------------------------------------------------------------- the real dev set

DEV_COUNTS = {
    ("COVID-19",): {"train": 1419, "val": 230, "test": 215},
    ("COVID-19", "Non-COVID", "Normal"): {"train": 1579, "val": 270, "test": 255},
}


@pytest.mark.parametrize(
    "classes",
    [
        pytest.param(("COVID-19",), id="covid"),
        pytest.param(("COVID-19", "Non-COVID", "Normal"), id="all_classes", marks=pytest.mark.slow),
    ],
)
def test_dev_folder_gives_readme_counts(dev_data: Path, tmp_path: Path, classes: tuple[str, ...]) -> None:
    report = run_extract(dev_data, tmp_path, classes=classes)
    m = read_metrics(tmp_path)
    assert {s: m[s]["count"] for s in KAGGLE_SPLIT_DIRS} == DEV_COUNTS[classes]
    assert report.counts == DEV_COUNTS[classes]
    assert m["skipped_total"] == 0 and report.messages == []
    assert all(v == 0 for s in KAGGLE_SPLIT_DIRS for v in m[s]["fixed"].values())
    assert [m[s]["classes"]["COVID-19"] for s in KAGGLE_SPLIT_DIRS] == [1419, 230, 215]
    for s in KAGGLE_SPLIT_DIRS:
        st = m[s]["infected_fraction_covid"]
        assert 0 < st["min"] <= st["median"] <= st["max"] < 0.6 and 0.08 < st["mean"] < 0.2
    rows = read_csv_rows(tmp_path / "extracted" / "manifest.csv")
    assert len(rows) == sum(DEV_COUNTS[classes].values())
    assert {(r["height"], r["width"]) for r in rows} == {("256", "256")}
    with zipfile.ZipFile(tmp_path / "extracted" / "subset.zip") as z:
        assert len(z.namelist()) == 3 * len(rows)
        for r in rows[::97]:  # the stored files are the source files, byte for byte
            assert (
                z.read(f"{r['split']}/{r['class']}/images/{Path(r['image_path']).name}")
                == (dev_data / r["image_path"]).read_bytes()
            )
