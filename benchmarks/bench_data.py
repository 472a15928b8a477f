"""Benchmark extract + preprocess on the real dev data, scaled to the full COVID-19 subset.

Measures, each with wall-clock and CPU seconds (user + system, this process and its workers):
  1. the dev folder as is (1,864 COVID-19 triplets): extract, then preprocess at 256 px;
  2. a scaled copy with 2,913 COVID-19 triplets, the size of the full Kaggle COVID-19 subset
     (the 1,864 real triplets plus 1,049 left-right mirrored copies under new names, so that
     the duplicate check keeps them), split 1864/466/583 like the official splits, read
     as a folder with 1 and 2 worker processes and as a Kaggle-style zip;
  3. a no-op ``dvc repro preprocess`` (second run, nothing changed) in a temporary copy of
     the repository with ``data.source`` set to the dev folder.
Writes ``benchmarks/results/data.json`` and ``benchmarks/results/data.md``.

Run from the repository root: ``python benchmarks/bench_data.py`` (about 2-5 minutes).
Everything temporary goes to a folder under the system temp dir, removed at the end.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from covidseg.atomic import write_json, write_text  # noqa: E402
from covidseg.data.extract import extract  # noqa: E402
from covidseg.data.preprocess import preprocess  # noqa: E402
from covidseg.params import DataParams, PreprocessParams  # noqa: E402

from conftest import DEV_DATA, make_repo_copy  # noqa: E402

NEST = "Infection Segmentation Data/Infection Segmentation Data"
KINDS = ("images", "infection masks", "lung masks")
FULL_SPLITS = {"Train": 1864, "Val": 466, "Test": 583}  # official COVID-19 counts, 2,913 in all
RESULTS = REPO / "benchmarks" / "results"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args, **kwargs) -> tuple[object, dict]:
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu_seconds() - c0, 2)}


def build_scaled(dest: Path) -> Path:
    """A folder in the Kaggle layout with 2,913 distinct COVID-19 triplets (see the module doc)."""
    triplets = []
    for split_dir in ("Train", "Val", "Test"):
        img_dir = DEV_DATA / NEST / split_dir / "COVID-19" / "images"
        triplets += [(img_dir.parent, p.name) for p in sorted(img_dir.iterdir())]
    total = sum(FULL_SPLITS.values())
    plan = [(d, n, False) for d, n in triplets] + [(d, n, True) for d, n in triplets[: total - len(triplets)]]
    bounds = np.cumsum(list(FULL_SPLITS.values()))
    for k, (class_dir, name, mirror) in enumerate(plan):
        split_dir = list(FULL_SPLITS)[int(np.searchsorted(bounds, k, side="right"))]
        for kind in KINDS:
            target = dest / NEST / split_dir / "COVID-19" / kind / f"covid_{k + 1}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if mirror:
                with Image.open(class_dir / kind / name) as img:
                    Image.fromarray(np.ascontiguousarray(np.asarray(img)[:, ::-1])).save(target)
            else:
                shutil.copyfile(class_dir / kind / name, target)
    return dest


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip a layout folder the way Kaggle's download is packed (deflated members)."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for p in sorted(folder.rglob("*.png")):
            z.write(p, p.relative_to(folder).as_posix())
    return archive


def run_pair(src: Path, work: Path, workers: int | None) -> dict:
    report, t_ext = timed(
        extract, src, work / "extracted", work / "data.json", DataParams(source=str(src)), workers=workers
    )
    counts, t_pre = timed(preprocess, work / "extracted", work / "prepared", PreprocessParams(image_size=256))
    shutil.rmtree(work)
    return {
        "counts": report.counts,
        "skipped": report.skipped_total,
        "workers": workers,
        "extract": t_ext,
        "preprocess": t_pre,
        "total_wall_s": round(t_ext["wall_s"] + t_pre["wall_s"], 2),
        "total_cpu_s": round(t_ext["cpu_s"] + t_pre["cpu_s"], 2),
    }


def dvc_noop(tmp: Path) -> dict:
    repo = make_repo_copy(tmp / "repo", params={"data": {"source": str(DEV_DATA)}})
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    dvc = [str(Path(sys.executable).parent / "dvc"), "repro", "preprocess"]
    t0 = time.perf_counter()
    first = subprocess.run(dvc, cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    t1 = time.perf_counter()
    second = subprocess.run(dvc, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    t2 = time.perf_counter()
    if first.returncode or second.returncode:
        raise RuntimeError(f"dvc repro failed:\n{first.stderr[-3000:]}\n{second.stderr[-3000:]}")
    return {
        "first_run_wall_s": round(t1 - t0, 2),
        "noop_wall_s": round(t2 - t1, 2),
        "noop_output_tail": second.stdout.strip().splitlines()[-2:],
    }


def main() -> None:
    if not DEV_DATA.is_dir():
        raise SystemExit(f"{DEV_DATA}: dev data not found; the benchmark needs it")
    results: dict = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "nice": os.nice(0),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
    }
    with tempfile.TemporaryDirectory(prefix="covidseg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        results["dev_folder_1864"] = run_pair(DEV_DATA, tmp / "dev", None)
        _, t_build = timed(build_scaled, tmp / "scaled")
        results["scaled_2913_build"] = t_build
        for workers in (1, 2):
            results[f"scaled_2913_folder_workers{workers}"] = run_pair(tmp / "scaled", tmp / "run", workers)
        archive = zip_folder(tmp / "scaled", tmp / "covidqu.zip")
        results["scaled_2913_zip"] = run_pair(archive, tmp / "run", None)
        shutil.rmtree(tmp / "scaled")
        results["dvc_repro_preprocess_dev"] = dvc_noop(tmp)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "data.json", results)
    write_text(RESULTS / "data.md", to_markdown(results))
    print(json.dumps(results, indent=2))


def to_markdown(r: dict) -> str:
    lines = [
        "# Data benchmark (extract + preprocess)",
        "",
        f"Written by `benchmarks/bench_data.py` on {r['when']}; {r['machine']['cpus']} CPUs, "
        f"nice {r['machine']['nice']}, load average {r['machine']['loadavg_start']} at the start and "
        f"{r['machine']['loadavg_end']} at the end. Wall time depends on what else runs; CPU time "
        "(user + system, workers included) does much less.",
        "",
        "| run | triplets (train/val/test) | workers | extract wall / CPU s | preprocess wall / CPU s | total wall s |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("dev_folder_1864", "scaled_2913_folder_workers1", "scaled_2913_folder_workers2", "scaled_2913_zip"):
        x = r[key]
        c = x["counts"]
        lines.append(
            f"| {key} | {c['train']}/{c['val']}/{c['test']} | {x['workers'] or 'default'} | "
            f"{x['extract']['wall_s']} / {x['extract']['cpu_s']} | {x['preprocess']['wall_s']} / {x['preprocess']['cpu_s']} | "
            f"{x['total_wall_s']} |"
        )
    d = r["dvc_repro_preprocess_dev"]
    lines += [
        "",
        f"No-op `dvc repro preprocess` on the dev folder (second run, nothing changed): {d['noop_wall_s']} s wall "
        f"(the first run, which extracts and preprocesses, took {d['first_run_wall_s']} s).",
        "",
        "The scaled set is the 1,864 real dev triplets plus 1,049 mirrored copies (new names, new pixels), "
        "2,913 in all, split 1864/466/583 like the official COVID-19 splits.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
