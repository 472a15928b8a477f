"""Distributed training: `torchrun --nproc-per-node=2` with gloo on the CPU, against one process.

The data is tiny and made with the pipeline's own library functions. It is deliberately uneven:
5 training images (the sharding pads to 3 + 3) and 1 validation image, so rank 1 validates on
no image at all; that must neither hang nor poison the metrics.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from covidseg.data.extract import extract
from covidseg.data.preprocess import preprocess
from covidseg.data.synth import synthesize
from covidseg.model.checkpoint import load_model
from covidseg.params import DataParams, PreprocessParams, SynthParams
from covidseg.training.distributed import DistContext

from conftest import TINY_PARAMS, VENV_BIN, run

WORKER = Path(__file__).with_name("ddp_worker.py")
TRAIN = dict(TINY_PARAMS["train"], epochs=2)
NPROC = 2


@pytest.fixture(scope="module", params=[0.0, 0.9], ids=["raw-weights", "weight-average"])
def runs(request, tmp_path_factory) -> dict[str, Path]:
    """Prepared data, then one single-process run and one 2-process torchrun on it (without and with train.ema_decay)."""
    root = tmp_path_factory.mktemp("ddp")
    synthesize(root / "raw", SynthParams(train=5, val=1, test=1, negatives=0, image_size=64), seed=3)
    extract(root / "raw", root / "extracted", root / "data.json", DataParams(source=str(root / "raw")))
    preprocess(root / "extracted", root / "prepared", PreprocessParams(image_size=64))
    params = json.dumps(dict(TRAIN, ema_decay=request.param))
    env = {"OMP_NUM_THREADS": "1"}
    run(
        [sys.executable, str(WORKER), str(root / "prepared"), str(root / "single"), params],
        cwd=root,
        timeout=300,
        env=env,
    )
    torchrun = shutil.which("torchrun", path=str(VENV_BIN)) or "torchrun"
    proc = run(
        [
            torchrun,
            "--standalone",
            f"--nproc-per-node={NPROC}",
            str(WORKER),
            str(root / "prepared"),
            str(root / "ddp"),
            params,
        ],
        cwd=root,
        timeout=300,
        env=env,
    )
    (root / "ddp" / "torchrun.log").write_text(proc.stdout + proc.stderr)
    return {"single": root / "single", "ddp": root / "ddp"}


def _files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


def _curves(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        return list(reader.fieldnames or []), list(reader)


def test_every_rank_ends_with_the_same_weights(runs):
    ranks = runs["ddp"] / "ranks"
    states = [torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in range(NPROC)]
    assert states[0].keys() == states[1].keys()
    params = {name for name, _ in load_model(runs["ddp"] / "run" / "models" / "model.pt")[0].named_parameters()}
    differ = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not [k for k in differ if k in params], f"DDP parameters differ between ranks: {differ}"
    # BatchNorm running statistics are buffers that each rank updates from its own shard.
    assert not differ, f"buffers differ between ranks (BatchNorm running stats not synchronised): {differ[:4]}..."
    # What rank 0 saved is the model every rank holds.
    saved = torch.load(runs["ddp"] / "run" / "models" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], states[0][k]) for k in saved)


def test_ranks_agree_on_the_metrics(runs):
    ranks = runs["ddp"] / "ranks"
    summaries = [json.loads((ranks / f"summary{r}.json").read_text()) for r in range(NPROC)]
    for key in ("epochs_run", "best_epoch", "val_dice_at_0.5", "threshold"):
        assert summaries[0]["summary"][key] == summaries[1]["summary"][key], key
    for a, b in zip(summaries[0]["rows"], summaries[1]["rows"]):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert summaries[0]["summary"]["world_size"] == NPROC


def test_ddp_writes_what_one_process_writes(runs):
    single, ddp = runs["single"] / "run", runs["ddp"] / "run"
    assert _files(ddp) == _files(single)
    assert "models/resume/state.pt" not in _files(ddp)  # removed once training completes
    for d in (single, ddp):
        model, meta = load_model(d / "models" / "model.pt")
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)  # infection + lung head (on by default)
        assert {"threshold", "temperature", "size", "best_epoch", "train_params", "seed"} <= set(meta)
    m_single = json.loads((single / "metrics" / "train.json").read_text())
    m_ddp = json.loads((ddp / "metrics" / "train.json").read_text())
    assert m_single.keys() == m_ddp.keys()
    log_single, log_ddp = (json.loads((d / "models" / "train_log.json").read_text()) for d in (single, ddp))
    assert (log_single["world_size"], log_ddp["world_size"]) == (1, NPROC)
    cols_single, rows_single = _curves(single / "plots" / "curves.tsv")
    cols_ddp, rows_ddp = _curves(ddp / "plots" / "curves.tsv")
    assert cols_single == cols_ddp
    assert (
        [r["epoch"] for r in rows_single]
        == [r["epoch"] for r in rows_ddp]
        == [str(e) for e in range(1, TRAIN["epochs"] + 1)]
    )
    for row in rows_ddp:  # rank 1 held no val image: sums over ranks must stay finite
        for col in cols_ddp:
            assert float(row[col]) == float(row[col]), f"{col} is NaN in epoch {row['epoch']}"
    # Only rank 0 wrote: the worker's per-rank files are the only per-rank output.
    assert sorted(p.name for p in (runs["ddp"] / "ranks").iterdir()) == [
        "rank0.pt",
        "rank1.pt",
        "summary0.json",
        "summary1.json",
    ]


@pytest.mark.parametrize("n,world", [(5, 2), (3, 8), (1, 4), (16, 4)])
def test_shard_covers_every_index_with_equal_shares(n, world):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [DistContext(rank=r, world_size=world).shard(perm) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)  # same steps on every rank
    assert set(torch.cat(shards).tolist()) == set(range(n))
