"""Test helper: run covidseg.training.loop.train (alone or under torchrun) and keep each rank's final weights.

    python tests/ddp_worker.py PREPARED OUT_DIR PARAMS_JSON
    torchrun --standalone --nproc-per-node=2 tests/ddp_worker.py PREPARED OUT_DIR PARAMS_JSON

The library writes the run's outputs (rank 0 only) under OUT_DIR/run/. This script additionally
saves every rank's final state_dict to OUT_DIR/ranks/rank{RANK}.pt and its returned summary to
OUT_DIR/ranks/summary{RANK}.json, so a test can compare the ranks; that per-rank writing is the
test's, not the library's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import covidseg.training.loop as train_mod
import covidseg.training.run as run_mod
from covidseg.params import TrainParams, from_dict


def main(prepared: str, out_dir: str, params_json: str) -> None:
    out = Path(out_dir)
    run = out / "run"
    params = from_dict(TrainParams, "train", json.loads(params_json))
    rank = int(os.environ.get("RANK", 0))

    # Capture the trained model of this rank: Trainer.finish runs on every rank, so wrap it.
    finals: dict = {}
    original_finish = train_mod.Trainer.finish

    def finish(self, *args):
        summary = original_finish(self, *args)
        finals["state_dict"] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        finals["rows"] = list(self.rows)
        return summary

    train_mod.Trainer.finish = finish
    summary = run_mod.train(
        prepared,
        run / "models" / "model.pt",
        run / "models" / "resume",
        run / "plots" / "curves.tsv",
        run / "metrics" / "train.json",
        params,
        seed=7,
    )
    ranks = out / "ranks"
    ranks.mkdir(parents=True, exist_ok=True)
    torch.save(finals["state_dict"], ranks / f"rank{rank}.pt")
    (ranks / f"summary{rank}.json").write_text(json.dumps({"summary": summary, "rows": finals["rows"]}, default=float))


if __name__ == "__main__":
    main(*sys.argv[1:4])
