"""The check stage refuses, promptly and in one line, every source extract would refuse.

The FIFO and /dev/zero cases run the stage script in a subprocess with a timeout (and a memory
cap), so a regression fails the test instead of hanging the suite or filling the machine.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from covidseg.check import STAMP_TEXT, check
from covidseg.data.extract import ExtractError, extract
from covidseg.data.sources import SourceError
from covidseg.params import DataParams

from conftest import set_params
from helpers import KAGGLE_NEST, make_kaggle_dataset, write_triplet

REPO = Path(__file__).resolve().parents[1]
PROMPT_S = 30  # the stage takes about 1 s; a hang or an endless read is killed here
OUTS = ["data/raw/synthetic", "data/checked.txt"]


def _params(tmp_path: Path, source: Path | str, **data) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(source), **data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _limit_memory() -> None:  # in the child: 3 GiB of address space, so an endless read dies early
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def run_stage(tmp_path: Path, source: Path | str, **data) -> subprocess.CompletedProcess:
    """``python stages/check.py`` on a params file naming ``source``; fails the test after PROMPT_S."""
    params = _params(tmp_path, source, **data)
    cmd = [sys.executable, "stages/check.py", "--params", str(params), "--stamp", str(tmp_path / "checked.txt")]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=PROMPT_S, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the check stage did not return within {PROMPT_S} s on {source}")
    proc.elapsed = time.monotonic() - start
    return proc


def assert_refused(proc: subprocess.CompletedProcess, *parts: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def refusal(tmp_path: Path, source: Path, **data) -> str:
    """The SourceError message of check() in this process."""
    (tmp_path / "checked.txt").unlink(missing_ok=True)
    with pytest.raises(SourceError) as err:
        check(_params(tmp_path, source, **data), tmp_path / "checked.txt", OUTS, repo=tmp_path)
    assert not (tmp_path / "checked.txt").exists()
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- the source itself


def test_fifo_source_is_refused_promptly(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    proc = run_stage(tmp_path, tmp_path / "pipe")
    assert_refused(proc, f"{tmp_path / 'pipe'}: data source is a FIFO (named pipe), not a regular file or folder")
    assert proc.elapsed < 10


def test_dev_zero_is_refused_promptly(tmp_path: Path) -> None:
    proc = run_stage(tmp_path, "/dev/zero")
    assert_refused(proc, "/dev/zero: data source is a character device, not a regular file or folder")
    assert proc.elapsed < 10


def test_symlink_loop_source_is_one_line_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert_refused(run_stage(tmp_path, tmp_path / "a"), f"{tmp_path / 'a'}: data source is a symlink loop")
    # inside the repository too (produced_by_pipeline resolves the path first)
    monkeypatch.chdir(tmp_path)
    assert "data source is a symlink loop" in refusal(tmp_path, Path("a"))


def test_dangling_symlink_and_missing_source(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    msg = refusal(tmp_path, tmp_path / "link")
    assert f"{tmp_path / 'link'}: data source not found (a symlink to '{tmp_path / 'gone'}'" in msg
    assert f"{tmp_path / 'nothing'}: data source not found" in refusal(tmp_path, tmp_path / "nothing")


def test_symlink_to_a_valid_folder_passes_and_the_stamp_is_constant(tmp_path: Path) -> None:
    make_kaggle_dataset(tmp_path / "src", per_split=1)
    (tmp_path / "link").symlink_to(tmp_path / "src")
    found = check(_params(tmp_path, tmp_path / "link"), tmp_path / "checked.txt", OUTS, repo=tmp_path)
    assert "3 triplets of COVID-19" in found
    assert (tmp_path / "checked.txt").read_text() == STAMP_TEXT


# ---------------------------------------------------------------- the layout


def test_missing_lung_mask_folder(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=2)
    for p in (root / "Val" / "COVID-19" / "lung masks").iterdir():
        p.unlink()
    (root / "Val" / "COVID-19" / "lung masks").rmdir()
    msg = refusal(tmp_path, tmp_path / "src")
    assert msg.startswith(f"{root}/Val/COVID-19/lung masks: folder missing or without .png files"), msg
    with pytest.raises(ExtractError, match="no usable COVID-19 pairs in split"):  # what extract would do
        extract(tmp_path / "src", tmp_path / "x", tmp_path / "m.json", DataParams(source=str(tmp_path / "src")))


def test_missing_folder_of_a_requested_negative_class(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=1, negatives=1)
    for p in (root / "Test" / "Normal" / "lung masks").iterdir():
        p.unlink()
    assert check(_params(tmp_path, tmp_path / "src"), tmp_path / "checked.txt", OUTS, repo=tmp_path)  # not asked for
    msg = refusal(tmp_path, tmp_path / "src", classes=["COVID-19", "Normal"])
    assert f"{root}/Test/Normal/lung masks: folder missing" in msg and "remove 'Normal' from params" in msg


def test_non_image_file_fails_under_fail_and_empties_a_split_under_skip(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=1)
    write_triplet(root, "Val", "COVID-19", "covid_50.png", 50)
    bad = root / "Val" / "COVID-19" / "lung masks" / "covid_50.png"
    bad.write_bytes(b"this is not an image")
    msg = refusal(tmp_path, tmp_path / "src", on_error="fail")
    assert msg.startswith(f"{bad}: not an image (starts with b'this is '"), msg
    assert "[unreadable; data.on_error is 'fail']" in msg
    # under skip one bad triplet is skipped by extract, so check lets it through ...
    assert check(_params(tmp_path, tmp_path / "src"), tmp_path / "checked.txt", OUTS, repo=tmp_path)
    # ... but not a split whose every COVID-19 triplet is bad
    (root / "Val" / "COVID-19" / "images" / "covid_2.png").write_bytes(b"")
    msg = refusal(tmp_path, tmp_path / "src")
    assert f"{tmp_path / 'src'}: no usable COVID-19 triplets in split(s) val" in msg
    assert f"first: {root}/Val/COVID-19/images/covid_2.png: empty file, not an image" in msg


def test_non_image_zip_member(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=1)
    (root / "Test" / "COVID-19" / "infection masks" / "covid_3.png").write_bytes(b"GIF8 no")
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(root.rglob("*.png")):
            z.write(p, f"{KAGGLE_NEST}/{p.relative_to(root).as_posix()}")
    msg = refusal(tmp_path, archive, on_error="fail")
    assert msg.startswith(f"{archive}::{KAGGLE_NEST}/Test/COVID-19/infection masks/covid_3.png: not an image"), msg


def test_fifo_and_device_inside_the_layout_are_refused_under_skip_too(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=2)
    fifo = root / "Train" / "COVID-19" / "images" / "covid_1.png"
    fifo.unlink()
    os.mkfifo(fifo)
    assert_refused(run_stage(tmp_path, tmp_path / "src"), f"{fifo}: a FIFO (named pipe), not a regular file")
    fifo.unlink()
    fifo.symlink_to("/dev/zero")
    assert_refused(run_stage(tmp_path, tmp_path / "src"), f"{fifo}: a character device, not a regular file")


def test_symlink_loop_inside_the_layout(tmp_path: Path) -> None:
    root = make_kaggle_dataset(tmp_path / "src", per_split=1)
    loop = root / "Test" / "COVID-19" / "images" / "covid_3.png"
    loop.unlink()
    loop.symlink_to(loop)
    msg = refusal(tmp_path, tmp_path / "src", on_error="fail")
    assert msg.startswith(f"{loop}: symlink loop"), msg
    assert "no usable COVID-19 triplets in split(s) test" in refusal(tmp_path, tmp_path / "src")


# Defects of one triplet: ``name(split_dir)`` is that split's first COVID-19 file name.
def _no_lung(root: Path, name) -> None:
    (root / "Val" / "COVID-19" / "lung masks" / name("Val")).unlink()


def _no_image(root: Path, name) -> None:
    (root / "Train" / "COVID-19" / "images" / name("Train")).unlink()


def _no_mask(root: Path, name) -> None:
    (root / "Test" / "COVID-19" / "infection masks" / name("Test")).unlink()


def _not_png(root: Path, name) -> None:
    (root / "Val" / "COVID-19" / "infection masks" / name("Val")).write_bytes(b"<html>")


def _size(root: Path, name) -> None:
    write_triplet(root.parents[2] / "scratch", "Val", "COVID-19", name("Val"), 2, size=16)
    (root.parents[2] / "scratch" / "Val" / "COVID-19" / "lung masks" / name("Val")).replace(
        root / "Val" / "COVID-19" / "lung masks" / name("Val")
    )


@pytest.mark.parametrize("defect", [_no_lung, _no_image, _no_mask, _not_png, _size], ids=lambda d: d.__name__[1:])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize("per_split", [1, 2])
def test_check_refuses_exactly_when_extract_does(tmp_path: Path, defect, on_error: str, per_split: int) -> None:
    """One bad triplet: under fail both refuse; under skip both refuse only when it empties its split."""
    root = make_kaggle_dataset(tmp_path / "src", per_split=per_split)
    defect(root, lambda split_dir: sorted(p.name for p in (root / split_dir / "COVID-19" / "images").iterdir())[0])
    src = tmp_path / "src"
    data = DataParams(source=str(src), on_error=on_error)
    try:
        extract(src, tmp_path / "x", tmp_path / "m.json", data, workers=1)
        extract_refused = False
    except (ExtractError, SourceError):
        extract_refused = True
    try:
        check(_params(tmp_path, src, on_error=on_error), tmp_path / "checked.txt", OUTS, repo=tmp_path)
        check_refused = False
    except SourceError:
        check_refused = True
    assert check_refused == extract_refused
    assert check_refused == (on_error == "fail" or per_split == 1)


# ---------------------------------------------------------------- the real data


def test_real_dev_folder_passes_quickly(dev_data: Path, tmp_path: Path) -> None:
    check(_params(tmp_path, dev_data), tmp_path / "warm.txt", OUTS, repo=tmp_path)  # warm the page cache
    start = time.perf_counter()
    found = check(
        _params(tmp_path, dev_data, classes=["COVID-19", "Non-COVID", "Normal"]),
        tmp_path / "checked.txt",
        OUTS,
        repo=tmp_path,
    )
    elapsed = time.perf_counter() - start
    assert "2104 triplets of COVID-19, Non-COVID, Normal" in found
    assert elapsed < 2.0, f"check took {elapsed:.2f} s on the dev folder"


# ---------------------------------------------------------------- under dvc repro


def test_dvc_repro_with_a_fifo_source_stops_at_check_without_hashing_it(tiny_repo: Path, tmp_path: Path) -> None:
    """check has no ${data.source} dep, so DVC never reads the FIFO; extract (which has) never starts."""
    os.mkfifo(tmp_path / "pipe")
    set_params(tiny_repo, {"data": {"source": str(tmp_path / "pipe")}})
    dvc_bin = Path(sys.executable).parent / "dvc"
    try:
        proc = subprocess.run(
            [str(dvc_bin), "repro"],
            cwd=tiny_repo,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("dvc repro hung on a FIFO data.source")
    assert proc.returncode != 0
    assert "Running stage 'check'" in proc.stdout and "Running stage 'extract'" not in proc.stdout, proc.stdout
    assert f"{tmp_path / 'pipe'}: data source is a FIFO (named pipe)" in proc.stderr, proc.stderr
