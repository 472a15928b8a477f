"""What `covidseg predict --precision bf16` changes against the default fp32, and how much faster it is.

One torch model file on real films (e.g. the dev data's Test COVID-19 images), run through the
same code as `covidseg predict` (:func:`covidseg.inference.backends.load_any_model`) in fp32 and
in bf16. Measured per image at the model's input size: the share of mask pixels that change
(pixels whose mask differs / pixels in either mask), the infected share of each lung (percent,
lungs from the fp32 run's lung head, so only the infection mask differs) and the 0-8 extent score,
and throughput (images/s, best of ``--repeats`` full passes after a warm-up). Results go to
benchmarks/results/predict_precision.json and .md.

Usage: python benchmarks/bench_predict_precision.py MODEL.pt FOLDER [--limit 215] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import numpy as np
import torch

from covidseg.atomic import write_json, write_text
from covidseg.data.arrays import resize_image
from covidseg.data.decode import decode_grey
from covidseg.device import cpu_has_native_bf16
from covidseg.inference.backends import load_any_model
from covidseg.masks.severity import LUNG_THRESHOLD, image_severity

RESULTS = Path(__file__).resolve().parent / "results"


def load_images(folder: Path, size: int, limit: int) -> tuple[list[str], np.ndarray]:
    """Names and uint8 (N, 1, size, size) grey images of the first ``limit`` PNGs of ``folder`` (sorted)."""
    paths = sorted(folder.glob("*.png"))[:limit]
    if not paths:
        raise SystemExit(f"{folder}: no PNG images")
    images = np.stack([resize_image(decode_grey(p.read_bytes(), str(p))[0], size) for p in paths])[:, None]
    return [p.name for p in paths], images


def timed(run, images: np.ndarray, batch: int, repeats: int) -> tuple[list, float]:
    """(outputs of one full pass, best images/s over ``repeats`` passes after a warm-up batch)."""
    run(images[:batch])
    best, outs = 0.0, []
    for _ in range(repeats):
        start, outs = time.perf_counter(), []
        for i in range(0, len(images), batch):
            outs.append(run(images[i : i + batch]))
        best = max(best, len(images) / (time.perf_counter() - start))
    return outs, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--limit", type=int, default=215)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    prepared = {p: load_any_model(args.model, device="cpu", precision=p) for p in ("fp32", "bf16")}
    names, images = load_images(args.folder, prepared["fp32"].size, args.limit)
    results, rates = {}, {}
    for precision, model in prepared.items():
        outs, rates[precision] = timed(model.run, images, args.batch_size, args.repeats)
        results[precision] = (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))
    threshold = prepared["fp32"].threshold
    masks = {p: results[p][0] >= threshold for p in results}
    lungs = results["fp32"][1] >= LUNG_THRESHOLD
    changed = (masks["fp32"] ^ masks["bf16"]).sum((1, 2))
    union = (masks["fp32"] | masks["bf16"]).sum((1, 2))
    share_diff, extent_diff = [], []
    for i in range(len(images)):
        sev = {p: image_severity(masks[p][i], lungs[i]) for p in masks}
        for side in ("right_pct", "left_pct"):
            a, b = sev["fp32"][side], sev["bf16"][side]
            if np.isfinite(a) and np.isfinite(b):
                share_diff.append(abs(a - b))
        extent_diff.append(abs(int(sev["fp32"]["extent_score"]) - int(sev["bf16"]["extent_score"])))
    share_diff, extent_diff = np.array(share_diff), np.array(extent_diff)
    prob_diff = np.abs(results["fp32"][0] - results["bf16"][0])
    summary = {
        "date": datetime.date.today().isoformat(),
        "model": str(args.model),
        "images": len(images),
        "folder": str(args.folder),
        "cpu": platform.processor() or platform.machine(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "threshold": threshold,
        "flip_tta": "as calibrated in the model file",
        "mask_pixels_changed_share": float(changed.sum() / max(union.sum(), 1)),
        "images_with_any_mask_change": int((changed > 0).sum()),
        "prob_max_abs_diff": float(prob_diff.max()),
        "prob_mean_abs_diff": float(prob_diff.mean()),
        "lung_share_abs_change_mean_points": float(share_diff.mean()),
        "lung_share_abs_change_p95_points": float(np.percentile(share_diff, 95)),
        "lung_share_abs_change_max_points": float(share_diff.max()),
        "lungs_compared": int(len(share_diff)),
        "extent_score_changed_images": int((extent_diff > 0).sum()),
        "images_per_second": rates,
        "bf16_speedup": rates["bf16"] / rates["fp32"],
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "predict_precision.json", summary)
    s = summary
    write_text(
        RESULTS / "predict_precision.md",
        "# `covidseg predict --precision bf16` against fp32\n\n"
        f"{s['date']}; `{Path(s['model']).name}` on {s['images']} films of `{s['folder']}`; CPU native bf16: "
        f"{s['cpu_native_bf16']}, {s['threads']} threads, batch {s['batch_size']}.\n\n"
        "| measure | value |\n|---|---|\n"
        f"| mask pixels that change (of pixels in either mask) | {100 * s['mask_pixels_changed_share']:.2f} % |\n"
        f"| films with any changed mask pixel | {s['images_with_any_mask_change']} of {s['images']} |\n"
        f"| probability change, max / mean | {s['prob_max_abs_diff']:.3f} / {s['prob_mean_abs_diff']:.4f} |\n"
        f"| per-lung infected share change, mean / 95th pct / max (points) | "
        f"{s['lung_share_abs_change_mean_points']:.2f} / {s['lung_share_abs_change_p95_points']:.2f} / "
        f"{s['lung_share_abs_change_max_points']:.2f} ({s['lungs_compared']} lungs) |\n"
        f"| films whose 0-8 extent score changes | {s['extent_score_changed_images']} of {s['images']} |\n"
        f"| images/s fp32 / bf16 | {rates['fp32']:.1f} / {rates['bf16']:.1f} (x{s['bf16_speedup']:.2f}) |\n",
    )
    print((RESULTS / "predict_precision.md").read_text())


if __name__ == "__main__":
    main()
