"""The share of a labelled-data gap that a semi-supervised run recovers, on the same val films, with intervals.

    PYTHONPATH=src python benchmarks/gap_recovered.py --few A/per_image.csv --semi B/per_image.csv \\
        --all C/per_image.csv --out DIR [--metric dice_fixed]

A: the few labelled films only; B: the same few plus the rest unlabeled (self-training); C: every film
labelled. Each CSV is a per-image table of one model on the same val films (``covidseg evaluate ...
--split val``). Writes ``DIR/gap.json`` and ``DIR/gap.md``: the means, the paired differences B - A,
C - A and C - B with 95 % bootstrap intervals (films resampled as pairs), and the share of the gap
(B - A) / (C - A), its interval from the same resamples of the films.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from covidseg.atomic import write_json, write_text  # noqa: E402
from covidseg.evaluation.agreement import paired_bootstrap_diff  # noqa: E402

RESAMPLES, SEED = 1000, 0


def joined(paths: dict[str, Path], metric: str) -> pd.DataFrame:
    """One row per film scored by all three runs: columns ``few``, ``semi``, ``all`` of ``metric``."""
    tables = []
    for name, path in paths.items():
        table = pd.read_csv(path, dtype={"id": str})
        if metric not in table:
            raise SystemExit(f"{path}: no column {metric!r}")
        tables.append(table.set_index("id")[[metric]].rename(columns={metric: name}))
    both = pd.concat(tables, axis=1, join="inner").dropna()
    if len(both) < 10:
        raise SystemExit(f"only {len(both)} films are scored by all three runs")
    return both


def share_of_gap(both: pd.DataFrame) -> dict:
    """(semi - few) / (all - few) of the means, and its 95 % percentile interval over films resampled."""
    v = both[["few", "semi", "all"]].to_numpy()
    rng = np.random.default_rng(SEED)
    ratios = []
    for _ in range(RESAMPLES):
        m = v[rng.integers(0, len(v), len(v))].mean(0)
        if m[2] != m[0]:
            ratios.append((m[1] - m[0]) / (m[2] - m[0]))
    m = v.mean(0)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"share": float((m[1] - m[0]) / (m[2] - m[0])), "low": float(low), "high": float(high)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("few", "semi", "all"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metric", default="dice_fixed")
    args = parser.parse_args()
    both = joined({"few": args.few, "semi": args.semi, "all": args.all}, args.metric)
    result = {"metric": args.metric, "films": len(both), "means": {k: float(both[k].mean()) for k in both}}
    for a, b in (("semi", "few"), ("all", "few"), ("all", "semi")):
        d = paired_bootstrap_diff(both[a], both[b], n_resamples=RESAMPLES, seed=SEED)
        result[f"{a}_minus_{b}"] = {"diff": d.diff, "low": d.low, "high": d.high, "excludes_zero": d.excludes_zero}
    result["share_of_gap"] = share_of_gap(both)
    write_json(args.out / "gap.json", result)
    rows = [f"| {k} | {v:.4f} |" for k, v in result["means"].items()]
    rows += [
        f"| {k.replace('_minus_', ' - ')} | {v['diff']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}] |"
        for k, v in result.items()
        if k.endswith(("_few", "_semi")) and isinstance(v, dict)
    ]
    g = result["share_of_gap"]
    rows.append(f"| share of the gap (semi - few) / (all - few) | {g['share']:.2f} [{g['low']:.2f}, {g['high']:.2f}] |")
    text = f"{len(both)} val films, per-image {args.metric}\n\n| | value |\n|---|---|\n" + "\n".join(rows) + "\n"
    write_text(args.out / "gap.md", text)
    print(text)


if __name__ == "__main__":
    main()
