"""Paired comparison of two runs on the same test images (``covidseg compare A B``).

Two runs evaluated on the same split differ image by image; the question is whether the mean
difference is larger than what resampling the images could give. The per-image tables
(``plots/eval/per_image.csv``) are joined on ``id``, the per-image differences ``A - B`` of one
column are bootstrapped (images resampled with replacement, fixed seed), and the 95 % interval
says whether the difference excludes zero. An interval that holds 0 is a tie: choose on val, not
on this.

A run is named by a per-image CSV, a folder holding ``plots/eval/per_image.csv`` (a checkout or an
experiment's temporary copy) or ``per_image.csv``, a git revision, or a DVC experiment name (its
ref under ``refs/exps/``), read with ``git show`` from the repository in ``repo``. A table is keyed by
its ``id`` column, or by ``stem`` (``covidseg predict``'s ``predictions.csv``, whose columns such as
``infected_fraction`` then compare two models on one external set).

Strict: duplicate ids, no shared ids, different id sets, fewer than :data:`MIN_PAIRED` images where
both runs have a value, non-numeric values, an unknown column, an unreadable repository and an
experiment name that matches several experiments are each a :class:`CompareError` naming the file.
"""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidseg.evaluation.agreement import paired_bootstrap_diff

PER_IMAGE = "plots/eval/per_image.csv"
MIN_PAIRED = 10  # images with a value in both runs, at the least: fewer cannot give a useful interval
# Per-image columns with a direction (the verdict's); any other column (e.g. pred_fraction, a predict
# table's infected share) has none: the verdict then says which run is higher, not which is better.
LOWER_IS_BETTER = ("rmse", "hd95_fixed", "hd95_tuned")
HIGHER_IS_BETTER_PREFIXES = ("dice", "iou", "precision", "recall")


class CompareError(ValueError):
    """A run cannot be found or read, or the two runs did not score the same images."""


@dataclass(frozen=True)
class Comparison:
    """``metric`` means of A and B over the shared images, A - B with its interval, and the verdict."""

    metric: str
    n: int
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    excludes_zero: bool

    @property
    def verdict(self) -> str:
        if not self.excludes_zero:
            return "tie: the interval holds 0"
        if self.metric in LOWER_IS_BETTER:
            return "A is better" if self.diff < 0 else "B is better"
        if self.metric.startswith(HIGHER_IS_BETTER_PREFIXES):
            return "A is better" if self.diff > 0 else "B is better"
        return "A is higher" if self.diff > 0 else "A is lower"


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    if not repo.is_dir():
        raise CompareError(f"--repo {repo}: no such folder, so no git revision or experiment can be read from it")
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def _experiment_ref(repo: Path, name: str) -> str | None:
    """The git ref of DVC experiment ``name`` (``refs/exps/xx/yyyy.../name``), or None; CompareError when several
    experiments have that name (every `make real` is called real-preset), listing them to pick from."""
    refs = _git(repo, "for-each-ref", "--format=%(refname) %(objectname:short) %(committerdate:iso)", "refs/exps")
    found = [line.split(" ", 2) for line in refs.stdout.splitlines() if line.split(" ")[0].rsplit("/", 1)[-1] == name]
    if len(found) > 1:
        listed = "; ".join(f"{sha} ({when})" for _, sha, when in found)
        raise CompareError(f"{name}: {len(found)} experiments have this name; name one by its commit: {listed}")
    return found[0][0] if found else None


def read_run(spec: str, repo: str | Path = ".") -> pd.DataFrame:
    """The per-image table of a run named by ``spec`` (see the module doc); CompareError if none."""
    path, repo = Path(spec), Path(repo)
    if path.is_file():
        return _read_csv(path.read_text(encoding="utf-8"), spec)
    if path.is_dir():
        for candidate in (path / PER_IMAGE, path / "per_image.csv"):
            if candidate.is_file():
                return _read_csv(candidate.read_text(encoding="utf-8"), str(candidate))
        raise CompareError(f"{spec}: folder holds neither {PER_IMAGE} nor per_image.csv")
    ref = _experiment_ref(repo, spec)
    rev = ref or spec
    shown = _git(repo, "show", f"{rev}:{PER_IMAGE}")
    if shown.returncode != 0:
        raise CompareError(
            f"{spec}: not a file, a folder, a git revision or a DVC experiment of {repo.resolve()} "
            f"holding {PER_IMAGE} ({shown.stderr.strip().splitlines()[-1] if shown.stderr.strip() else 'not found'})"
        )
    return _read_csv(shown.stdout, f"{rev}:{PER_IMAGE}")


def _read_csv(text: str, name: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(io.StringIO(text), dtype={"id": str, "stem": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CompareError(f"{name}: not a per-image table ({exc})") from None
    if "id" not in table.columns:
        if "stem" not in table.columns:
            raise CompareError(f"{name}: no 'id' (evaluate) or 'stem' (predict) column, so not a per-image table")
        table = table.rename(columns={"stem": "id"})
    repeated = table["id"][table["id"].duplicated()].unique()
    if len(repeated):
        shown = ", ".join(map(str, repeated[:5])) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise CompareError(f"{name}: {len(repeated)} id(s) appear more than once ({shown}): one row per image")
    table.attrs["source"] = name
    return table


def _names(a: pd.DataFrame, b: pd.DataFrame) -> str:
    return f"{a.attrs.get('source', 'run A')} and {b.attrs.get('source', 'run B')}"


def digits_for(*values: float, least: int = 4) -> int:
    """Decimals that show ``values`` (a difference and its interval ends) with two significant digits of the
    smallest non-zero magnitude among them, and at least ``least``: 1e-5 prints as 0.000010, not -0.0000."""
    magnitudes = [abs(v) for v in values if v and np.isfinite(v)]
    if not magnitudes:
        return least
    return min(12, max(least, int(np.ceil(-np.log10(min(magnitudes)))) + 1))


def compare(
    a: pd.DataFrame,
    b: pd.DataFrame,
    metric: str = "dice_tuned",
    n_resamples: int = 1000,
    seed: int = 0,
    min_paired: int = MIN_PAIRED,
) -> Comparison:
    """Paired bootstrap of ``metric`` (a per-image column) between runs A and B on the images they share.

    Images must match exactly (same ids): two runs on different splits are not comparable and raise
    CompareError. Images where either run has no value (NaN, e.g. Dice of an empty truth and an
    empty prediction) are left out of both means, as in the runs' own per-image means.
    """
    for name, table in (("A", a), ("B", b)):
        where = table.attrs.get("source", f"run {name}")
        if len(set(table["id"])) != len(table):
            raise CompareError(f"{where}: ids appear more than once: one row per image")
        if metric not in table.columns:
            numeric = [c for c in table.columns if c != "id" and pd.api.types.is_numeric_dtype(table[c])]
            raise CompareError(f"{where}: no per-image column {metric!r}; choose one of {numeric}")
        values = pd.to_numeric(table[metric], errors="coerce")
        bad = table[metric][values.isna() & table[metric].notna()]
        if len(bad):
            raise CompareError(
                f"{where}: column {metric!r} holds {len(bad)} non-numeric value(s), e.g. {bad.iloc[0]!r} "
                f"(image {table['id'][bad.index[0]]})"
            )
    ids_a, ids_b = set(a["id"]), set(b["id"])
    if not ids_a & ids_b:
        raise CompareError(f"{_names(a, b)}: no image id in common: not runs on the same images")
    if ids_a != ids_b:
        raise CompareError(
            f"{_names(a, b)}: the runs scored different images ({len(ids_a - ids_b)} only in A, "
            f"{len(ids_b - ids_a)} only in B): compare runs on the same test split"
        )
    joined = a[["id", metric]].merge(b[["id", metric]], on="id", suffixes=("_a", "_b"), validate="one_to_one")
    va = pd.to_numeric(joined[f"{metric}_a"]).to_numpy(float)
    vb = pd.to_numeric(joined[f"{metric}_b"]).to_numpy(float)
    keep = ~(np.isnan(va) | np.isnan(vb))
    if keep.sum() < min_paired:
        raise CompareError(
            f"{_names(a, b)}: only {int(keep.sum())} of {len(keep)} images have {metric!r} in both runs; "
            f"a paired interval needs at least {min_paired}"
        )
    d = paired_bootstrap_diff(va, vb, np.mean, n_resamples=n_resamples, seed=seed)
    return Comparison(
        metric,
        d.n,
        float(va[keep].mean()) if keep.any() else float("nan"),
        float(vb[keep].mean()) if keep.any() else float("nan"),
        d.diff,
        d.low,
        d.high,
        d.excludes_zero,
    )
