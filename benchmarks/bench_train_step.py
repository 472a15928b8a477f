"""Training throughput: the real training loop against a bare model step at the same batch.

A bare step is forward + loss + backward + optimiser step on one fixed in-memory batch: the
ceiling for the loop. The loop adds batch assembly from uint8 arrays, optional augmentation,
progress and metric bookkeeping. Results go to benchmarks/results/train_step.json.

Usage: python benchmarks/bench_train_step.py [--images 64] [--size 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from covidseg.data.synth import make_case
from covidseg.device import autocast, choose_device, choose_precision
from covidseg.model.losses import make_loss, segmentation_loss
from covidseg.model.unet import UNet, UNetConfig
from covidseg.params import TrainParams
from covidseg.training.distributed import DistContext
from covidseg.training.loop import Trainer

CONFIGS = {
    "report_default (base 16, depth 4, full res, bce)": TrainParams(base_channels=16, depth=4, downsample=1),
    "real_preset (base 16, depth 5, downsample 2, bce_dice + lung aux)": TrainParams(
        base_channels=16, depth=5, downsample=2, loss="bce_dice", lung_aux_weight=0.5
    ),
}


def make_prepared(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    cases = [make_case(rng, size, True) for _ in range(n)]
    arrays = {k: np.stack([c[i] for c in cases])[:, None] for i, k in enumerate(("images", "masks", "lungs"))}
    arrays["masks"] = (arrays["masks"] > 0).astype(np.uint8)
    arrays["lungs"] = (arrays["lungs"] > 0).astype(np.uint8)
    for split in ("train", "val"):
        np.savez(
            root / f"{split}.npz",
            **arrays,
            ids=np.array([f"c{i}" for i in range(n)]),
            classes=np.array(["COVID-19"] * n),
        )


def bare_step_rate(p: TrainParams, size: int, steps: int) -> float:
    device = choose_device(p.device)
    precision = choose_precision(device, p.precision)
    torch.manual_seed(0)
    aux = p.lung_aux_weight > 0
    model = UNet(
        UNetConfig(out_channels=2 if aux else 1, base_channels=p.base_channels, depth=p.depth, downsample=p.downsample)
    )
    model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr)
    loss_fn = make_loss(p)
    x = torch.rand(p.batch_size, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(p.batch_size, 2 if aux else 1, size, size, device=device) > 0.8).float()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast(device, precision):
            logits = model(x)
        loss = segmentation_loss(logits.float(), y, loss_fn, p.lung_aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return p.batch_size / float(np.median(times[1:]))


def loop_rate(p: TrainParams, prepared: Path, resume: Path) -> float:
    trainer = Trainer(prepared, resume, dataclasses.replace(p, epochs=2), 0, DistContext(), log=lambda *a: None)
    trainer._train_epoch(1)  # warm-up epoch
    trainer.train_seconds, trainer.train_images = 0.0, 0
    trainer._train_epoch(2)
    return trainer.train_images / trainer.train_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = ap.parse_args()
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "batch_size": 8,
        "size": args.size,
        "images_per_epoch": args.images,
        "configs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        make_prepared(Path(tmp), args.images, args.size)
        for name, p in CONFIGS.items():
            device = choose_device(p.device)
            bare = bare_step_rate(p, args.size, steps=args.images // p.batch_size)
            plain = loop_rate(p, Path(tmp), Path(tmp) / "r1")
            augmented = loop_rate(dataclasses.replace(p, augment=True), Path(tmp), Path(tmp) / "r2")
            results["configs"][name] = {
                "precision": choose_precision(device, p.precision),
                "bare_step_img_per_s": round(bare, 2),
                "loop_img_per_s": round(plain, 2),
                "loop_augmented_img_per_s": round(augmented, 2),
                "loop_over_bare": round(plain / bare, 3),
                "augmented_loop_over_bare": round(augmented / bare, 3),
            }
            print(name, results["configs"][name], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
