"""Paired severity errors of two models on the same films, with 95 % bootstrap intervals.

    PYTHONPATH=src python benchmarks/paired_severity.py A/severity.csv B/severity.csv --out DIR

Each CSV is the severity table of one model on the same films (``plots/eval/severity.csv``, or
``curves/severity.csv`` of ``covidseg evaluate ... --split val``). Per film: ``share_error``, the mean
over its lungs of |predicted - true infected share| (percentage points; a lung without a truth or a
prediction is left out), and ``extent_error``, |predicted - true extent score| (0-8 scale). Writes
``DIR/severity_paired.json`` and ``.md``: both means and A - B with its interval (films resampled as
pairs, 1000 resamples, seed 0). Lower is better for both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import pandas as pd  # noqa: E402

from covidseg.atomic import write_json, write_text  # noqa: E402
from covidseg.evaluation.agreement import paired_bootstrap_diff  # noqa: E402
from covidseg.evaluation.severity_intervals import film_share_error  # noqa: E402
from covidseg.masks.share_interval import SIDES  # noqa: E402

RESAMPLES, SEED = 1000, 0


def film_errors(path: Path) -> pd.DataFrame:
    """``share_error`` and ``extent_error`` per film (index: the image id) of one severity table."""
    table = pd.read_csv(path, dtype={"image": str})
    needed = [f"{kind}_{lung}_pct" for kind in ("true", "pred") for lung in SIDES]
    needed += ["true_extent_score", "pred_extent_score"]
    missing = [column for column in ["image", *needed] if column not in table]
    if missing:
        raise SystemExit(f"{path}: not a severity table, no columns {missing}")
    share = film_share_error(table)
    extent = (table["pred_extent_score"] - table["true_extent_score"]).abs()
    return pd.DataFrame({"share_error": share, "extent_error": extent.to_numpy()}, index=table["image"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    a, b = film_errors(args.a), film_errors(args.b)
    shared = a.index.intersection(b.index)
    if len(shared) < 10:
        raise SystemExit(f"only {len(shared)} films are in both tables")
    result: dict = {"a": str(args.a), "b": str(args.b), "films": int(len(shared))}
    rows = []
    for metric in ("share_error", "extent_error"):
        both = pd.concat([a.loc[shared, metric], b.loc[shared, metric]], axis=1, keys=["a", "b"]).dropna()
        d = paired_bootstrap_diff(both["a"], both["b"], n_resamples=RESAMPLES, seed=SEED)
        verdict = "tie" if not d.excludes_zero else ("A is better" if d.diff < 0 else "B is better")
        result[metric] = {
            "a": float(both["a"].mean()),
            "b": float(both["b"].mean()),
            "a_minus_b": d.diff,
            "low": d.low,
            "high": d.high,
            "paired_films": d.n,
            "verdict": verdict,
        }
        r = result[metric]
        rows.append(
            f"| {metric} | {r['a']:.3f} | {r['b']:.3f} | {d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {verdict} |"
        )
    write_json(args.out / "severity_paired.json", result)
    text = (
        f"A: {args.a}\nB: {args.b}\n{len(shared)} films (lower is better)\n\n"
        "| per film | A | B | A - B, paired | verdict |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    write_text(args.out / "severity_paired.md", text)
    print(text)


if __name__ == "__main__":
    main()
