"""The reference model's fp32 and int8 ONNX files: images/s and CPU-ms per image at batch 1 and 16, and the
wall time of `covidseg predict` over a folder end to end (decode, model, masks, overlays, CSV).

Both graphs have flip averaging inside (as the reference was calibrated), so every image costs two
forward passes. Throughput is the best of ``--repeats`` full passes after a warm-up; CPU-ms per image
is process CPU time (all threads) over images, so with 2 cores busy it is about twice the wall time.
Results go to benchmarks/results/int8.json and .md.

Usage: python benchmarks/bench_int8.py FOLDER [--limit 215] [--repeats 3]
       (FOLDER: e.g. the dev data's Test/COVID-19/images)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from covidseg.atomic import write_json, write_text
from covidseg.data.arrays import resize_image
from covidseg.data.decode import decode_grey
from covidseg.inference.onnx_runtime import OnnxPredictor
from covidseg.inference.predict import PredictOptions, load_model_for_predict, predict_files
from covidseg.inference.reference import FP32_ONNX, INT8_ONNX, reference_dir

RESULTS = Path(__file__).resolve().parent / "results"


def _throughput(predictor: OnnxPredictor, images: np.ndarray, batch: int, repeats: int) -> dict:
    predictor.run(images[:batch], batch_size=batch)  # warm-up
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        predictor.run(images, batch_size=batch)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return {"images_per_second": len(images) / best_wall, "cpu_ms_per_image": 1000 * best_cpu / len(images)}


def _end_to_end(model: Path, paths: list[Path], repeats: int) -> float:
    loaded = load_model_for_predict(model, PredictOptions(batch_size=16))
    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            predict_files(paths, Path(out), loaded, PredictOptions(batch_size=16))
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--limit", type=int, default=215)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    paths = sorted(args.folder.glob("*.png"))[: args.limit]
    if not paths:
        raise SystemExit(f"{args.folder}: no PNG images")
    ref = reference_dir()
    fp32, int8 = OnnxPredictor(ref / FP32_ONNX), OnnxPredictor(ref / INT8_ONNX)
    images = np.stack([resize_image(decode_grey(p.read_bytes(), str(p))[0], fp32.size) for p in paths])[:, None]
    rows = {}
    for name, predictor in (("fp32", fp32), ("int8", int8)):
        for batch in (1, 16):
            rows[f"{name} batch {batch}"] = _throughput(predictor, images, batch, args.repeats)
    e2e = {
        name: _end_to_end(ref / f, paths, max(1, args.repeats - 1))
        for name, f in (("fp32", FP32_ONNX), ("int8", INT8_ONNX))
    }
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "images": len(paths),
        "throughput": rows,
        "predict_folder_seconds": e2e,
        "int8_over_fp32_time": e2e["int8"] / e2e["fp32"],
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "int8.json", result)
    lines = [
        f"# Reference model, fp32 and int8 ONNX ({result['date']}, {result['machine']}, {len(paths)} films, "
        "flip averaging inside both graphs)",
        "",
        "| model, batch | images/s | CPU-ms per image |",
        "|---|---|---|",
        *(f"| {k} | {v['images_per_second']:.1f} | {v['cpu_ms_per_image']:.1f} |" for k, v in rows.items()),
        "",
        f"`covidseg predict` over the folder (batch 16, PNG masks, overlays and CSV written): fp32 "
        f"{e2e['fp32']:.1f} s, int8 {e2e['int8']:.1f} s ({result['int8_over_fp32_time']:.2f} of fp32's time).",
        "",
    ]
    write_text(RESULTS / "int8.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
