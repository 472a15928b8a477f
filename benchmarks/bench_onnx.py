"""CPU inference throughput: torch (covidseg.inference.forward) against onnxruntime (covidseg.inference.onnx_runtime).

The model is the default-size U-Net (base 16, depth 4, downsample 2, one output) on 256 px
images, channels_last as a loaded model is, with random weights (throughput does not depend on them) and the default calibration
(temperature only). Both sides take uint8 (N, 1, S, S) and return calibrated float32 (N, S, S)
probabilities, fp32, with the same number of threads. Results go to benchmarks/results/onnx.json
and onnx.md.

Usage: python benchmarks/bench_onnx.py [--seconds 8]
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
import onnxruntime
import torch

from covidseg.atomic import write_json, write_text
from covidseg.export.graph import export_onnx, parity
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.inference.onnx_runtime import OnnxPredictor
from covidseg.model.unet import UNet, UNetConfig

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 256
CONFIG = UNetConfig(base_channels=16, depth=4, downsample=2)


def rate(fn, batch: np.ndarray, seconds: float) -> dict:
    """Images/s of ``fn(batch)`` over at least ``seconds`` wall (after one warm-up call), with CPU time."""
    fn(batch)
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while calls < 3 or time.perf_counter() - wall0 < seconds:
        fn(batch)
        calls += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = calls * len(batch)
    return {
        "calls": calls,
        "images": n,
        "wall_s": round(wall, 3),
        "images_per_s": round(n / wall, 2),
        "cpu_ms_per_image": round(1000 * cpu / n, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="minimum timed wall seconds per measurement")
    args = ap.parse_args()
    load_start = os.getloadavg()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    # channels_last as covidseg.model.checkpoint.load_model leaves it (predict_logits feeds channels_last input).
    model = UNet(CONFIG).to(memory_format=torch.channels_last).eval()
    cal = Calibration(threshold=0.5, temperature=1.3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path, SIZE, {}, calibration=cal)
        export_s = time.perf_counter() - t0
        runner = OnnxPredictor(path, threads=threads)
        size_mb = path.stat().st_size / 2**20
        images = np.random.default_rng(0).integers(0, 256, (16, 1, SIZE, SIZE), dtype=np.uint8)
        max_diff = parity(lambda x: calibrated_probabilities(model, x, torch.device("cpu"), "fp32", cal), path, images)
        rows = []
        for batch in (1, 16):
            x = images[:batch]

            def torch_fn(b, n=batch):
                return calibrated_probabilities(model, b, torch.device("cpu"), "fp32", cal, batch_size=n)

            def onnx_fn(b, n=batch):
                return runner.predict(b, batch_size=n)

            for engine, fn in (("torch", torch_fn), ("onnxruntime", onnx_fn)):
                rows.append({"engine": engine, "batch": batch, **rate(fn, x, args.seconds)})
                print(rows[-1], flush=True)
    result = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": threads,
            "load_avg_start": [round(v, 2) for v in load_start],
            "load_avg_end": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "model": {
            **CONFIG.to_dict(),
            "size": SIZE,
            "onnx_mb": round(size_mb, 2),
            "export_s": round(export_s, 1),
            "max_abs_diff_probability": max_diff,
        },
        "runs": rows,
    }
    write_json(RESULTS / "onnx.json", result)
    write_text(RESULTS / "onnx.md", render(result))


def render(r: dict) -> str:
    m, mod = r["machine"], r["model"]
    lines = [
        "# CPU inference: torch vs onnxruntime",
        "",
        f"Written by `benchmarks/bench_onnx.py` on {r['when']}; {m['cpus']} CPUs, {m['threads']} threads for both engines, "
        f"load average {m['load_avg_start']} at the start and {m['load_avg_end']} at the end (the cores are shared, "
        f"so wall rates depend on what else runs; CPU ms per image does much less). torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}.",
        "",
        f"Model: U-Net base {mod['base_channels']}, depth {mod['depth']}, downsample {mod['downsample']}, "
        f"{mod['size']} px, fp32, calibrated probabilities from uint8 images on both sides. ONNX file "
        f"{mod['onnx_mb']} MiB, export (with its parity check) {mod['export_s']} s, max |p_torch - p_onnx| "
        f"{mod['max_abs_diff_probability']:.2g} over 16 images.",
        "",
        "| engine | batch | images/s (wall) | CPU ms / image | timed images |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {x['engine']} | {x['batch']} | {x['images_per_s']} | {x['cpu_ms_per_image']} | {x['images']} |"
        for x in r["runs"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
