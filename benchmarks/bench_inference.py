"""The reference model's CPU inference speed: every engine and precision, batch 1 and 16, with and without flip
averaging, against the CPU's peak; onnxruntime's options; and `covidseg predict` over a folder end to end.

Rows (images/s of calibrated probabilities from uint8 images, and CPU-ms per image: process CPU time of
all threads over images, so with 2 busy cores about twice the wall time per image):
- torch fp32 and, where the CPU has native bf16, torch bf16 (models/reference/model.pt);
- onnxruntime fp32 and int8 (models/reference/model.onnx, model-int8.onnx: flip averaging inside the
  graph; without it, both exported and quantised here from model.pt the way the pipeline does).
Each is the best of ``--repeats`` passes over ``--images`` films after a warm-up.

FLOPs per image: 2 x multiply-adds of every Conv and ConvTranspose of the fp32 graph at its fixed input
size (the rest of the graph is under 1 %), doubled by flip averaging. Peak: cores x clock x operations per
cycle per core of the CPU's vector units (:func:`peak_per_second`); "of peak" is achieved FLOP/s over the
peak of the precision that does the multiply-adds (fp32, bf16 or int8). The clock is the one the OS
reports (a guest sees the base clock; boost raises the true peak, so a share can pass 100 %).

End to end: `covidseg predict` over the folder (batch 8, the CLI's default, and 16; masks, lungs, overlays,
CSV written), fp32 and int8 ONNX, with decoding and writing overlapped with the model (what predict does)
and, to show what that buys, one step after another.

Results: benchmarks/results/inference.json and .md.

Usage: python benchmarks/bench_inference.py FOLDER [--val VAL_FOLDER] [--images 64] [--repeats 3]
       (FOLDER: e.g. the dev data's Test/COVID-19/images; VAL_FOLDER calibrates the no-flip int8 graph)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import covidseg.inference.predict as predict_mod
from covidseg.atomic import write_json, write_text
from covidseg.data.arrays import resize_image
from covidseg.data.decode import decode_grey
from covidseg.device import cpu_has_native_bf16
from covidseg.export.graph import export_onnx
from covidseg.export.int8 import quantize
from covidseg.inference.backends import load_any_model
from covidseg.inference.calibration import Calibration
from covidseg.inference.onnx_runtime import INPUT_NAME
from covidseg.inference.predict import PredictOptions, predict_files
from covidseg.inference.reference import FP32_ONNX, INT8_ONNX, TORCH_FILE, reference_dir
from covidseg.model.checkpoint import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def conv_flops(path: Path) -> float:
    """FLOPs (2 x multiply-adds) of one pass of the network in an fp32 ONNX file without flip averaging (N = 1)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    shapes |= {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = weights[node.input[1]]
        if node.op_type == "Conv":  # w: (Cout, Cin, kh, kw), out: (N, Cout, H, W)
            total += 2.0 * np.prod(w) * np.prod(shapes[node.output[0]][2:])
        else:  # w: (Cin, Cout, kh, kw), in: (N, Cin, H, W)
            total += 2.0 * np.prod(w) * np.prod(shapes[node.input[0]][2:])
    flip = json.loads({p.key: p.value for p in model.metadata_props}.get("covidseg.flip_tta", "false"))
    return total / (2 if flip else 1)  # a flip-averaged graph holds the network twice


def peak_per_second() -> dict:
    """The CPU's peak multiply-add throughput per precision (operations/s, 2 per multiply-add) and how it follows.

    Per core and cycle: AMD Zen 4 (family 25 with AVX-512) has two 256-bit FMA pipes (512-bit ops take
    two passes): fp32 2 x 8 lanes x 2 = 32; bf16 dot products (vdpbf16ps) twice the lanes, 64; int8
    (vpdpbusd, VNNI) four times, 128. Intel server cores with two 512-bit FMA units: 64 / 128 / 256. AVX2
    cores with two 256-bit FMA units: fp32 32; int8 through vpmaddubsw + vpmaddwd about 64; no bf16.
    """
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace") if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(key)), "")  # noqa: E731
    flags, vendor, family = set(field("flags").split()), field("vendor_id"), field("cpu family")
    mhz = float(field("cpu MHz") or 0)
    if vendor == "AuthenticAMD" and family == "25" and "avx512f" in flags:
        kind, per_cycle = "AMD Zen 4 (2 x 256-bit FMA pipes)", {"fp32": 32, "bf16": 64, "int8": 128}
    elif "avx512f" in flags:
        kind, per_cycle = "AVX-512, 2 x 512-bit FMA units assumed", {"fp32": 64, "bf16": 128, "int8": 256}
    elif "avx2" in flags:
        kind, per_cycle = "AVX2 (2 x 256-bit FMA units)", {"fp32": 32, "int8": 64}
    else:
        return {"kind": "unknown", "per_cycle": {}, "ops_per_second": {}}
    if "avx512_bf16" not in flags:
        per_cycle.pop("bf16", None)
    cores = os.cpu_count() or 1
    return {
        "kind": kind,
        "cores": cores,
        "clock_ghz": mhz / 1000,
        "per_cycle": per_cycle,
        "ops_per_second": {k: cores * mhz * 1e6 * v for k, v in per_cycle.items()},
    }


def best_rate(fn: Callable[[np.ndarray], object], images: np.ndarray, batch: int, repeats: int) -> dict:
    """Best images/s of ``fn`` over ``images`` in batches of ``batch`` (one warm-up batch), with CPU-ms per image."""
    fn(images[:batch])
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(images), batch):
            fn(images[start : start + batch])
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return {"images_per_second": len(images) / best_wall, "cpu_ms_per_image": 1000 * best_cpu / len(images)}


def ort_runner(path: Path, threads: int = 0, spinning: bool = True, layout: bool = True) -> Callable:
    """uint8 (N, 1, S, S) -> the graph's outputs, with the options :class:`OnnxPredictor` leaves at default
    (``layout``: onnxruntime's NCHWc layout rewrite, part of its ORT_ENABLE_ALL optimisation level)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not layout:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT_NAME: x.astype(np.float32) / np.float32(255.0)})


def no_flip_graphs(ref: Path, calibration_images: np.ndarray, work: Path) -> tuple[Path, Path]:
    """The reference model exported without flip averaging (fp32) and quantised as the pipeline does (int8)."""
    net, meta = load_model(ref / TORCH_FILE, torch.device("cpu"))
    calibration = dataclasses.replace(Calibration.from_meta(meta), flip_tta=False)
    fp32 = export_onnx(
        net, work / "noflip.onnx", int(meta["size"]), {}, calibration=calibration, contrast=meta.get("contrast", "none")
    )
    return fp32, quantize(fp32, work / "noflip-int8.onnx", calibration_images)


def end_to_end(model: Path, paths: list[Path], batch: int, repeats: int, overlapped: bool) -> float:
    """Best wall seconds of `covidseg predict` over ``paths`` (``overlapped`` False: one step after another)."""
    loaded = load_any_model(model, batch_size=batch)
    sequential = lambda items, load, run, write: (write(run(load(i))) for i in items)  # noqa: E731
    original = predict_mod.pipelined
    predict_mod.pipelined = original if overlapped else sequential
    try:
        best = float("inf")
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                predict_files(paths, Path(out), loaded, PredictOptions(batch_size=batch))
                best = min(best, time.perf_counter() - start)
    finally:
        predict_mod.pipelined = original
    return best


def _films(folder: Path, limit: int | None, size: int) -> tuple[list[Path], np.ndarray]:
    paths = sorted(folder.glob("*.png"))[:limit]
    if not paths:
        raise SystemExit(f"{folder}: no PNG images")
    return paths, np.stack([resize_image(decode_grey(p.read_bytes(), str(p))[0], size) for p in paths])[:, None]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--val", type=Path, default=None)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ref = reference_dir()
    size = int(json.loads((ref / "reference.json").read_text())["size"])
    all_paths, films = _films(args.folder, None, size)
    images = films[: args.images]
    _, val = _films(args.val or args.folder, 64, size)
    flops = conv_flops(ref / FP32_ONNX)
    peak = peak_per_second()
    rows = []

    def measure(engine: str, precision: str, flip: bool, fn: Callable, batch: int, note: str = "") -> None:
        r = best_rate(fn, images, batch, args.repeats)
        achieved = flops * (2 if flip else 1) * r["images_per_second"]
        top = peak["ops_per_second"].get(precision)
        rows.append(
            {
                "engine": engine,
                "precision": precision,
                "flip": flip,
                "batch": batch,
                "note": note,
                **r,
                "gflops_per_second": achieved / 1e9,
                "of_peak": achieved / top if top else None,
            }
        )
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        noflip_fp32, noflip_int8 = no_flip_graphs(ref, val, Path(tmp))
        graphs = {
            (True, "fp32"): ref / FP32_ONNX,
            (True, "int8"): ref / INT8_ONNX,
            (False, "fp32"): noflip_fp32,
            (False, "int8"): noflip_int8,
        }
        precisions = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
        for flip in (True, False):
            for batch in (1, 16):
                for precision in precisions:
                    loaded = load_any_model(ref / TORCH_FILE, flip_tta=flip, precision=precision, batch_size=batch)
                    measure("torch", precision, flip, loaded.run, batch)
                for precision in ("fp32", "int8"):
                    measure("onnxruntime", precision, flip, ort_runner(graphs[flip, precision]), batch)
        tuning = [
            ("threads 1", {"threads": 1}),
            ("no spinning", {"spinning": False}),
            ("no NCHWc layout", {"layout": False}),
        ]
        for precision in ("fp32", "int8"):
            for batch in (4, 8):
                measure("onnxruntime", precision, True, ort_runner(graphs[True, precision]), batch, f"batch {batch}")
            for note, options in tuning:
                measure("onnxruntime", precision, True, ort_runner(graphs[True, precision], **options), 16, note)
    e2e = {}
    for batch in (8, 16):
        for name, file in (("fp32", FP32_ONNX), ("int8", INT8_ONNX)):
            for overlapped in (True, False):
                key = f"{name} batch {batch} {'overlapped' if overlapped else 'one step after another'}"
                e2e[key] = end_to_end(ref / file, all_paths, batch, max(1, args.repeats - 1), overlapped)
                print(key, e2e[key], flush=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "films": {"timed": len(images), "end_to_end": len(all_paths)},
        "gflop_per_image_one_pass": flops / 1e9,
        "peak": peak,
        "rows": rows,
        "predict_folder_seconds": e2e,
        "int8_over_fp32_time": {
            b: e2e[f"int8 batch {b} overlapped"] / e2e[f"fp32 batch {b} overlapped"] for b in (8, 16)
        },
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "inference.json", result)
    write_text(RESULTS / "inference.md", report(result))
    print(report(result))


def report(result: dict) -> str:
    peak = result["peak"]
    lines = [
        f"# Reference model, CPU inference ({result['date']}, {result['machine']}; torch "
        f"{result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']})",
        "",
        f"Written by `benchmarks/bench_inference.py`. {result['films']['timed']} films timed per row (best of "
        f"the repeats); {result['gflop_per_image_one_pass']:.2f} GFLOP per image per pass (Conv and ConvTranspose "
        "multiply-adds x 2), twice that with flip averaging.",
        f"Peak: {peak['kind']}, {peak.get('cores')} cores x {peak.get('clock_ghz', 0):.2f} GHz x "
        + ", ".join(f"{k} {v}" for k, v in peak["per_cycle"].items())
        + " operations per cycle = "
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak["ops_per_second"].items())
        + " G/s at the clock the OS reports (a share over 100 % means the cores ran faster: boost).",
        "",
        "| engine | precision | flip | batch | note | images/s | CPU-ms per image | GFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        share = f"{100 * r['of_peak']:.0f} %" if r["of_peak"] is not None else ""
        lines.append(
            f"| {r['engine']} | {r['precision']} | {'on' if r['flip'] else 'off'} | {r['batch']} | {r['note']} | "
            f"{r['images_per_second']:.1f} | {r['cpu_ms_per_image']:.1f} | {r['gflops_per_second']:.0f} | {share} |"
        )
    lines += [
        "",
        f"`covidseg predict` over {result['films']['end_to_end']} films (masks, lungs, overlays, CSV), seconds:",
        "",
    ]
    lines += [f"- {k}: {v:.2f}" for k, v in result["predict_folder_seconds"].items()]
    lines += [
        "",
        "int8 over fp32 time (overlapped): "
        + ", ".join(f"batch {b} {v:.2f}" for b, v in result["int8_over_fp32_time"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
