"""A team shares real-data runs through a DVC remote: a teammate's clone reruns nothing anyone already ran.

The recipe of docs/teams.md ("Share real-data runs"), command for command, against a local-folder
remote and against a real S3-protocol server on 127.0.0.1 (moto's ThreadedMotoServer, through
dvc-s3 as users install it):

    a/   dvc add data/raw/covidqu.zip (a tiny dataset in the Kaggle layout, at the README's path);
         make real with tiny FLAGS; git commit; make push; git push;
         make real with a second configuration; make push (not committed)
    b/   git clone; dvc pull --run-cache; dvc repro runs nothing;
         make real with the second configuration's FLAGS trains nothing (every stage restored)
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import TINY_PARAMS, dvc, make_repo_copy, run

VENV = Path(sys.prefix)  # the test's own venv: `make` must not build another one in the copies
# The preset with the tiny sizes on top (FLAGS come after the preset's flags, so they win).
TINY_FLAGS = (
    "-S preprocess.image_size=64 -S train.epochs=1 -S train.warmup_epochs=0 -S train.base_channels=4 "
    "-S train.depth=3 -S train.downsample=1 -S train.batch_size=4 -S plots.gallery_size=2 -S plots.dpi=50"
)
SECOND_FLAGS = f"{TINY_FLAGS} -S train.lr=0.002"
ZIP = "data/raw/covidqu.zip"  # the README's path
# The commands of docs/teams.md's block, in its order (the test below runs each of them).
RECIPE = (
    "TINY='" + TINY_FLAGS + "'",
    f"dvc add {ZIP}",
    "dvc remote add -d shared ",
    'git commit -m "data and remote"',
    f'make real DATA={ZIP} FLAGS="$TINY"',
    'git commit -m "real-data run"',
    "make push",
    "git push origin HEAD:main",
    f'make real DATA={ZIP} FLAGS="$TINY -S train.lr=0.002"',
    "make push",
    "git clone -b main ",
    "dvc pull --run-cache",
    "dvc repro ",
    f'make real DATA={ZIP} FLAGS="$TINY -S train.lr=0.002"',
)


def _make(repo: Path, *args: str) -> str:
    """`make ARGS` in a copy, with the test's venv (``-o``: never reinstall it from the copy)."""
    stamp = VENV / ".installed"
    proc = run(["make", "-o", str(stamp), f"VENV={VENV}", f"STAMP={stamp}", *args], cwd=repo, timeout=900)
    return proc.stdout + proc.stderr


def _git(repo: Path, *args: str) -> str:
    return run(["git", *args], cwd=repo).stdout


def _kaggle_zip(path: Path, scratch: Path) -> None:
    """A tiny COVID-QU-Ex archive: the synthetic generator's Kaggle tree, zipped as Kaggle ships it."""
    from covidseg.data.synth import synthesize
    from covidseg.params import SynthParams

    tree = scratch / "tree"
    synthesize(tree, SynthParams(train=6, val=3, test=3, negatives=0, image_size=64), seed=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(tree.rglob("*.png")):
            z.write(f, f.relative_to(tree).as_posix())
    shutil.rmtree(tree)


# The S3 round trip runs by default (it is the two-clone test, against the remote teams use); the
# same recipe with a folder remote is marked slow (about 2 minutes each on 2 cores).
@pytest.fixture(params=[pytest.param("local", marks=pytest.mark.slow), "s3"])
def remote(request, tmp_path, monkeypatch):
    """``dvc remote`` commands for the team's storage: a folder, or a bucket on a local S3 server."""
    if request.param == "local":
        yield [["remote", "add", "-d", "shared", str(tmp_path / "storage")]]
        return
    import boto3
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)  # credentials from the environment, never in .dvc/config
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team-bucket")
        yield [
            ["remote", "add", "-d", "shared", "s3://team-bucket/covidseg"],
            ["remote", "modify", "shared", "endpointurl", endpoint],
        ]
    finally:
        server.stop()


def _ran(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Running stage")]


def test_a_teammate_reuses_every_pushed_run(tmp_path, remote):
    origin = tmp_path / "origin.git"
    a = make_repo_copy(tmp_path / "a", TINY_PARAMS)
    _kaggle_zip(a / ZIP, tmp_path)

    # A: the data under DVC at the README's path, the team's remote, the real-data command, commit, push.
    dvc(a, "add", ZIP)
    for args in remote:
        dvc(a, *args)
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "data and remote")
    first = _make(a, "real", f"DATA={ZIP}", f"FLAGS={TINY_FLAGS}")
    assert "Running stage 'train'" in first
    assert "data.source: data/raw/covidqu.zip" in (a / "dvc.lock").read_text()  # relative: the same in every clone
    _git(a, "add", "-A")
    _git(a, "commit", "-q", "-m", "real-data run")
    _make(a, "push")
    run(["git", "init", "-q", "--bare", str(origin)], cwd=tmp_path)
    _git(a, "remote", "add", "origin", str(origin))
    _git(a, "push", "-q", "origin", "HEAD:main")

    # A again: a second configuration, pushed (run records and outputs) but not committed.
    second = _make(a, "real", f"DATA={ZIP}", f"FLAGS={SECOND_FLAGS}")
    assert "Running stage 'train'" in second
    second_metrics = json.loads((a / "metrics" / "test.json").read_text())
    _make(a, "push")

    # B: a fresh clone pulls; `dvc repro` runs nothing, and the second configuration trains nothing.
    run(["git", "clone", "-q", "-b", "main", str(origin), str(tmp_path / "b")], cwd=tmp_path)
    b = tmp_path / "b"
    _git(b, "config", "user.email", "teammate@example.com")
    _git(b, "config", "user.name", "teammate")
    dvc(b, "pull", "--run-cache")
    repro = dvc(b, "repro")
    assert not _ran(repro.stdout + repro.stderr), repro.stdout
    out = _make(b, "real", f"DATA={ZIP}", f"FLAGS={SECOND_FLAGS}")
    assert "Running stage 'train'" not in out, out
    assert "Stage 'train' is cached - skipping run" in out, out
    assert not (b / "models" / "train_log.json").exists()  # nothing trained here
    assert json.loads((b / "metrics" / "test.json").read_text()) == second_metrics


def test_docs_show_the_recipe_this_test_runs():
    """docs/teams.md's "Share real-data runs" block holds this test's commands, in order, with its flags."""
    from conftest import REPO

    text = (REPO / "docs" / "teams.md").read_text(encoding="utf-8")
    section = text[text.index("### Share real-data runs") :]
    block = section[section.index("```bash\n") : section.index("```\n", section.index("```bash\n") + 8)]
    position = 0
    for command in RECIPE:
        found = block.find(command, position)
        assert found >= 0, f"docs/teams.md lacks (after the previous command): {command}"
        position = found + len(command)
