"""Sources: a folder or a zip read in place, the layout root found by structure at any depth."""

from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest

from covidseg.data.extract import extract
from covidseg.data.layout import find_roots
from covidseg.data.sources import (
    FolderSource,
    SourceError,
    ZipSource,
    locate_root,
    open_source,
    read_head,
    source_kind,
)
from covidseg.params import DataParams

from helpers import DEV_PART_PER_SPLIT, KAGGLE_NEST, dev_part_files, make_kaggle_dataset, read_csv_rows, write_triplet


def write_zip(path: Path, files: dict[str, Path], prefix: str, extra: dict[str, Path] | None = None) -> Path:
    """Zip ``files`` under ``prefix`` (with directory entries, as Kaggle's archive has) plus ``extra`` as is."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        dirs = set()
        for rel in files:
            parts = f"{prefix}{rel}".split("/")[:-1]
            dirs |= {"/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1)}
        for d in sorted(dirs):
            z.writestr(d, b"")
        for rel, src in files.items():
            z.write(src, f"{prefix}{rel}")
        for rel, src in (extra or {}).items():
            z.write(src, rel)
    return path


def extract_to(src: Path, work: Path, classes=("COVID-19",)) -> dict:
    extract(src, work / "extracted", work / "data.json", DataParams(source=str(src), classes=classes))
    return json.loads((work / "data_details.json").read_text())


def test_find_roots_by_structure_at_any_depth() -> None:
    dirs = {"a", "a/b", "a/b/Train", "a/b/Train/COVID-19", "x/Val/Normal", "Test/Non-COVID", "Train/other"}
    assert find_roots(dirs) == ["", "a/b", "x"]
    lung = {
        "Lung Segmentation Data/Lung Segmentation Data/Train/COVID-19",
        "__MACOSX/r/Val/COVID-19",
        ".hidden/Val/COVID-19",
    }
    assert find_roots(lung) == []


def test_dev_folder_root(dev_data: Path) -> None:
    with open_source(dev_data) as src:
        assert isinstance(src, FolderSource)
        assert locate_root(src) == KAGGLE_NEST


@pytest.mark.parametrize(
    "prefix",
    [f"{KAGGLE_NEST}/", "Infection Segmentation Data/", "", "download/covidqu/" + f"{KAGGLE_NEST}/"],
    ids=["kaggle_two_levels", "one_level", "top", "deeper"],
)
def test_partial_dev_zip_matches_folder(dev_data: Path, tmp_path: Path, prefix: str) -> None:
    files = dev_part_files(dev_data)
    archive = write_zip(tmp_path / "part.zip", files, prefix)
    with open_source(archive) as src:
        assert isinstance(src, ZipSource)
        assert locate_root(src) == prefix.rstrip("/")
    m = extract_to(archive, tmp_path / "z", classes=("COVID-19", "Normal"))
    assert [m[s]["count"] for s in ("train", "val", "test")] == [2 * DEV_PART_PER_SPLIT] * 3
    assert m["train"]["classes"] == {"COVID-19": DEV_PART_PER_SPLIT, "Normal": DEV_PART_PER_SPLIT}
    # The same files as a folder give the same hashes, fractions and subset bytes.
    folder = tmp_path / "folder"
    for rel, p in files.items():
        (folder / KAGGLE_NEST / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / KAGGLE_NEST / rel).write_bytes(p.read_bytes())
    extract_to(folder, tmp_path / "f", classes=("COVID-19", "Normal"))
    drop = ("image_path", "infection_path", "lung_path")
    zip_rows = [
        {k: v for k, v in r.items() if k not in drop} for r in read_csv_rows(tmp_path / "z/extracted/manifest.csv")
    ]
    dir_rows = [
        {k: v for k, v in r.items() if k not in drop} for r in read_csv_rows(tmp_path / "f/extracted/manifest.csv")
    ]
    assert zip_rows == dir_rows and len(zip_rows) == 6 * DEV_PART_PER_SPLIT
    assert (tmp_path / "z/extracted/subset.zip").read_bytes() == (tmp_path / "f/extracted/subset.zip").read_bytes()
    assert read_csv_rows(tmp_path / "z/extracted/manifest.csv")[0]["image_path"].startswith(
        prefix + "Train/COVID-19/images/"
    )


def test_zip_reads_only_needed_members_never_lung_data(dev_data: Path, tmp_path: Path, monkeypatch) -> None:
    files = dev_part_files(dev_data)
    lung_tree = {
        f"Lung Segmentation Data/Lung Segmentation Data/{rel.replace('infection masks', 'lung masks')}": p
        for rel, p in files.items()
    }
    archive = write_zip(tmp_path / "covidqu.zip", files, f"{KAGGLE_NEST}/", extra=lung_tree)
    read: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):  # every member opened from the source archive
        if self.filename == str(archive):
            read.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with open_source(archive) as src:
        assert not any("Lung Segmentation Data" in f for f in src.files)
        with pytest.raises(SourceError, match="not a dataset member"):
            src.read(next(iter(lung_tree)))
    m = extract_to(archive, tmp_path / "w")  # COVID-19 only
    assert [m[s]["count"] for s in ("train", "val", "test")] == [DEV_PART_PER_SPLIT] * 3
    assert read and not any("Lung Segmentation Data" in n for n in read)
    assert sorted(read) == sorted(f"{KAGGLE_NEST}/{rel}" for rel in files if "/COVID-19/" in rel)


def test_folder_never_walks_lung_data_or_macos_debris(tmp_path: Path) -> None:
    make_kaggle_dataset(tmp_path / "src", per_split=1)
    write_triplet(
        tmp_path / "src" / "Lung Segmentation Data" / "Lung Segmentation Data", "Train", "COVID-19", "covid_1.png", 1
    )
    write_triplet(tmp_path / "src" / "__MACOSX" / KAGGLE_NEST, "Train", "COVID-19", "covid_1.png", 1)
    (tmp_path / "src" / KAGGLE_NEST / "Train/COVID-19/images/._covid_1.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    with open_source(tmp_path / "src") as src:
        assert locate_root(src) == KAGGLE_NEST
        assert not any(f.startswith(("Lung", "__MACOSX")) for f in src.files)
    m = extract_to(tmp_path / "src", tmp_path / "w")
    assert m["skipped_total"] == 0 and m["train"]["count"] == 1


def test_no_layout_names_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "src" / "Train" / "images").mkdir(parents=True)
    (tmp_path / "src" / "Train" / "images" / "covid_1.png").write_bytes(b"x")
    with pytest.raises(SourceError) as err:
        extract_to(tmp_path / "src", tmp_path / "w")
    msg = str(err.value)
    assert str(tmp_path / "src") in msg and "no COVID-QU-Ex infection-segmentation layout found" in msg
    assert "Infection Segmentation Data/Infection Segmentation Data/Train/COVID-19/images" in msg
    assert not (tmp_path / "w").exists()


def test_zip_without_layout_and_other_bad_sources(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("Lung Segmentation Data/Train/COVID-19/images/covid_1.png", b"x")
    with pytest.raises(SourceError, match=r"other\.zip: no COVID-QU-Ex"):
        extract_to(tmp_path / "other.zip", tmp_path / "w")
    with pytest.raises(SourceError, match=r"missing\.zip: data source not found"):
        open_source(tmp_path / "missing.zip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match=r"notes\.txt: data source is neither a folder nor a \.zip"):
        open_source(tmp_path / "notes.txt")


def test_several_roots_is_an_error(tmp_path: Path) -> None:
    make_kaggle_dataset(tmp_path / "src", per_split=1, nest="copy1")
    make_kaggle_dataset(tmp_path / "src", per_split=1, nest="copy2")
    with pytest.raises(SourceError, match=r"several dataset roots found \['copy1', 'copy2'\]"):
        extract_to(tmp_path / "src", tmp_path / "w")


def test_corrupt_zip_member_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=2)
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.png"))}
    archive = write_zip(tmp_path / "a.zip", files, f"{KAGGLE_NEST}/")
    data = bytearray(archive.read_bytes())
    member = f"{KAGGLE_NEST}/Val/COVID-19/images/covid_3.png"
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 20 : start + 30] = b"\xff" * 10  # damage the compressed bytes: CRC or inflate error
    archive.write_bytes(bytes(data))
    report = extract(archive, tmp_path / "w/x", tmp_path / "w/m.json", DataParams(source=str(archive)))
    (msg,) = [m for m in report.messages if m.startswith("skipped (unreadable)")]
    assert member in msg and str(archive) in msg


@pytest.fixture
def fifo(tmp_path: Path):
    """A FIFO whose guard thread opens it for writing after a few seconds, so a reader that blocks on it
    gets EOF and the test fails instead of hanging."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    done = threading.Event()

    def guard() -> None:
        if not done.wait(5):
            with open(path, "wb"):
                pass

    thread = threading.Thread(target=guard, daemon=True)
    thread.start()
    start = time.monotonic()
    yield path
    done.set()
    assert time.monotonic() - start < 4, "something blocked on the FIFO"


def test_fifo_device_and_symlink_loop_are_refused_by_stat_alone(tmp_path: Path, fifo: Path) -> None:
    with pytest.raises(SourceError, match=r"pipe: data source is a FIFO \(named pipe\), not a regular file or folder"):
        open_source(fifo)
    with pytest.raises(SourceError, match=r"^/dev/zero: data source is a character device"):
        source_kind("/dev/zero")  # stat only: never opened, so this cannot read forever
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(SourceError, match=r"a: data source is a symlink loop"):
        open_source(tmp_path / "a")
    make_kaggle_dataset(tmp_path / "src", per_split=1)
    (tmp_path / "folder-link").symlink_to(tmp_path / "src")
    assert source_kind(tmp_path / "folder-link") == "folder"


def test_read_head_refuses_special_files_before_reading(tmp_path: Path, fifo: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=1)
    image = root / "Train" / "COVID-19" / "images" / "covid_1.png"
    with open_source(tmp_path / "src") as src:
        rel = image.relative_to(tmp_path / "src").as_posix()
        assert read_head(src, rel, 8) == b"\x89PNG\r\n\x1a\n"
        image.unlink()
        image.symlink_to(fifo)
        with pytest.raises(SourceError, match=r"covid_1\.png: a FIFO \(named pipe\), not a regular file"):
            read_head(src, rel, 8)
        image.unlink()
        image.symlink_to("/dev/zero")
        with pytest.raises(SourceError, match=r"covid_1\.png: a character device, not a regular file"):
            read_head(src, rel, 8)
        image.unlink()
        image.symlink_to(image)
        with pytest.raises(OSError, match=r"covid_1\.png: symlink loop"):
            read_head(src, rel, 8)


def test_recorded_source_path_is_relative_inside_the_checkout_and_absolute_outside(tmp_path, monkeypatch):
    from covidseg.data.sources import recorded_source_path

    repo = tmp_path / "repo"
    (repo / "data" / "raw").mkdir(parents=True)
    monkeypatch.chdir(repo)
    assert recorded_source_path("data/raw/covidqu.zip", repo) == ("data/raw/covidqu.zip", True)
    assert recorded_source_path(repo / "data" / "raw" / "covidqu.zip", repo) == ("data/raw/covidqu.zip", True)
    assert recorded_source_path("./data/../data/raw", repo) == ("data/raw", True)
    outside = tmp_path / "elsewhere" / "covidqu"
    assert recorded_source_path(outside, repo) == (outside.as_posix(), False)
    assert recorded_source_path("../elsewhere/covidqu", repo) == (outside.as_posix(), False)


def test_source_path_command_prints_the_recorded_path_and_says_when_it_is_absolute(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from covidseg.cli import app

    monkeypatch.chdir(tmp_path)
    inside = CliRunner().invoke(app, ["source-path", "data/raw/covidqu.zip"])
    assert inside.exit_code == 0 and inside.output.strip() == "data/raw/covidqu.zip"
    outside = CliRunner().invoke(app, ["source-path", "/srv/covidqu"])
    assert outside.exit_code == 0 and outside.output.strip().splitlines()[-1] == "/srv/covidqu"
    assert "the run cache then serves only clones that see the data at that same path" in outside.output
