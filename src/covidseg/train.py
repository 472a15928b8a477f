"""Train the U-Net on the preprocessed train split, select on val, save the best model.

One readable loop: data held in memory as uint8 tensors (no decoding in the loop),
optional augmentation, fp32 or bf16 autocast with channels_last, optional weight
averaging (validated and kept instead of the raw weights), a per-epoch resume state
(``resume_dir/state.pt``), early stopping on val Dice, and after training a threshold
and a temperature tuned on val. Under ``torchrun`` it runs DDP and only
rank 0 writes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covidseg import metrics
from covidseg.atomic import atomic_path, write_json, write_text
from covidseg.augment import augment_batch
from covidseg.device import autocast, choose_device, choose_precision
from covidseg.distributed import DistContext
from covidseg.ema import WeightAverage
from covidseg.inference import Calibration, predict_logits
from covidseg.losses import make_loss
from covidseg.model import UNet, UNetConfig
from covidseg.modelio import save_model
from covidseg.params import TrainParams
from covidseg.preprocess import load_split

CURVE_FIELDS = ["epoch", "train_loss", "val_loss", "train_rmse", "val_rmse", "val_dice", "val_iou", "lr", "seconds"]
THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.025), 3)
TEMPERATURES = np.round(np.exp(np.linspace(np.log(0.1), np.log(10.0), 81)), 4)  # ratio 1.059 per step; includes 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _fingerprint(params: TrainParams, seed: int, arrays: dict[str, np.ndarray]) -> str:
    """Identifies a run: params, seed and the training/validation data."""
    h = hashlib.sha256(json.dumps([dataclasses.asdict(params), seed], sort_keys=True, default=str).encode())
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).data)
    return h.hexdigest()


def lr_at(params: TrainParams, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a global step: linear warm-up, then constant or cosine decay to 1% of lr."""
    warmup = params.warmup_epochs * steps_per_epoch
    if step < warmup:
        return params.lr * (step + 1) / warmup
    if params.schedule == "constant":
        return params.lr
    total = max(params.epochs * steps_per_epoch - warmup, 1)
    progress = min((step - warmup) / total, 1.0)
    return params.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def _targets(masks: torch.Tensor, lungs: torch.Tensor, aux: bool) -> torch.Tensor:
    """uint8 (N, 1, S, S) masks -> float (N, K, S, S) targets; K = 2 with the lung auxiliary task."""
    return torch.cat([masks, lungs], 1).float() if aux else masks.float()


def _loss(logits: torch.Tensor, target: torch.Tensor, loss_fn, params: TrainParams) -> torch.Tensor:
    loss = loss_fn(logits[:, :1], target[:, :1])
    if params.lung_aux_weight > 0:
        loss = loss + params.lung_aux_weight * F.binary_cross_entropy_with_logits(logits[:, 1:2], target[:, 1:2])
    return loss


def _check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"training stopped: loss is {loss.item()} at epoch {epoch}, step {step}; "
            "lower train.lr, or use train.precision=fp32"
        )


def _format_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _overlap_sums(prob: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """Sums of per-image Dice and IoU at ``threshold`` and the number of images scored (empty-truth rule)."""
    counts = metrics.confusion(prob >= threshold, truth)
    d, j = metrics.dice(counts), metrics.iou(counts)
    return {"dice_sum": float(np.nansum(d)), "iou_sum": float(np.nansum(j)), "scored": float(np.sum(~np.isnan(d)))}


def val_scores(logits: torch.Tensor, masks: np.ndarray, threshold: float = 0.5, temperature: float = 1.0) -> dict[str, float]:
    """Per-image mean Dice/IoU (empty-truth rule of :mod:`covidseg.metrics`), and sums for RMSE.

    logits: float (N, S, S); masks: uint8 (N, 1, S, S) in {0, 1}.
    """
    prob = torch.sigmoid(logits / temperature).numpy()
    truth = masks[:, 0].astype(bool)
    return _overlap_sums(prob, truth, threshold) | {"sse": metrics.squared_error_sum(prob, truth), "pixels": float(truth.size)}


def tune_threshold(logits: torch.Tensor, masks: np.ndarray, temperature: float) -> float:
    """The threshold on THRESHOLDS that maximises mean per-image val Dice (ties: the one nearest 0.5)."""
    prob = torch.sigmoid(logits / temperature).numpy()  # once, not once per threshold
    truth = masks[:, 0].astype(bool)
    best, best_t = -1.0, 0.5
    for t in sorted(THRESHOLDS, key=lambda t: abs(t - 0.5)):
        s = _overlap_sums(prob, truth, float(t))
        score = s["dice_sum"] / max(s["scored"], 1)
        if score > best + 1e-9:
            best, best_t = score, float(t)
    return best_t


def tune_temperature(logits: torch.Tensor, masks: np.ndarray) -> float:
    """Temperature T on TEMPERATURES minimising val BCE of sigmoid(logit / T) (Guo et al. 2017)."""
    sub = logits[:, ::3, ::3].reshape(-1).double()
    truth = torch.from_numpy(masks[:, 0, ::3, ::3].reshape(-1).astype(np.float64))
    losses = [F.binary_cross_entropy_with_logits(sub / t, truth).item() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


class Trainer:
    """Holds the run's state; :meth:`run` trains, then :meth:`finish` selects and saves."""

    def __init__(self, prepared_dir: Path, resume_dir: Path, params: TrainParams, seed: int, ctx: DistContext, log=print):
        self.params, self.seed, self.ctx, self.log = params, seed, ctx, log
        self.resume_path = Path(resume_dir) / "state.pt"
        if params.num_threads:
            torch.set_num_threads(params.num_threads)
        device = choose_device(params.device)
        if device.type == "cuda" and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
        self.device = device
        self.precision = choose_precision(device, params.precision)
        ctx.init(device)
        train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
        if params.max_train_images and params.max_train_images < len(train["images"]):
            keep = np.sort(np.random.default_rng(seed).permutation(len(train["images"]))[: params.max_train_images])
            train = {k: v[keep] for k, v in train.items()}
        if len(train["images"]) == 0 or len(val["images"]) == 0:
            raise ValueError(f"{prepared_dir}: train and val splits must not be empty")
        self.fingerprint = _fingerprint(params, seed, {f"train_{k}": train[k] for k in ("images", "masks")} | {"val": val["images"]})
        self.train_x, self.train_m, self.train_l = (torch.from_numpy(train[k]) for k in ("images", "masks", "lungs"))
        self.val = val
        self.aux = params.lung_aux_weight > 0
        torch.manual_seed(seed)
        self.model = UNet(UNetConfig(out_channels=2 if self.aux else 1, base_channels=params.base_channels, depth=params.depth,
                                     downsample=params.downsample))
        self.model.to(device).to(memory_format=torch.channels_last)
        self.net = self.model
        if ctx.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.ema = WeightAverage(self.model, params.ema_decay) if params.ema_decay > 0 else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        self.loss_fn = make_loss(params.loss, params.pos_weight, params.focal_gamma)
        self.rows: list[dict] = []
        self.best_score, self.best_state, self.best_epoch, self.since_best = -1.0, None, 0, 0
        self.train_seconds, self.train_images = 0.0, 0
        self.start_epoch = 1
        self._maybe_resume()

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation, best-epoch selection and saving use: the weight average when there is one."""
        return self.ema.model if self.ema else self.model

    # ----- resume -------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "fingerprint": self.fingerprint, "epoch": len(self.rows), "rows": self.rows,
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "best_score": self.best_score, "best_state": self.best_state, "best_epoch": self.best_epoch,
            "since_best": self.since_best, "train_seconds": self.train_seconds, "train_images": self.train_images,
        }

    def _save_resume(self) -> None:
        if self.ctx.is_main:
            with atomic_path(self.resume_path) as tmp:
                torch.save(self._state(), tmp)

    def _maybe_resume(self) -> None:
        if not self.resume_path.exists():
            return
        try:
            state = torch.load(self.resume_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a resume file from another version is not fatal
            self.log(f"resume: ignoring unreadable {self.resume_path} ({exc})")
            return
        if state.get("fingerprint") != self.fingerprint:
            self.log(f"resume: {self.resume_path} is from other params or data; starting afresh")
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.rows = state["rows"]
        self.best_score, self.best_state, self.best_epoch = state["best_score"], state["best_state"], state["best_epoch"]
        self.since_best, self.train_seconds, self.train_images = state["since_best"], state["train_seconds"], state["train_images"]
        self.start_epoch = state["epoch"] + 1
        self.log(f"resume: continuing after epoch {state['epoch']} from {self.resume_path}")

    # ----- one epoch ----------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        p, ctx = self.params, self.ctx
        order_gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        aug_gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1009 + ctx.rank)
        order = ctx.shard(torch.randperm(len(self.train_x), generator=order_gen))
        steps_per_epoch = math.ceil(len(order) / p.batch_size)
        self.net.train()
        loss_sum = sse = pixels = seen = 0.0
        start = time.perf_counter()
        report_every = max(steps_per_epoch // 5, 1)
        for step in range(steps_per_epoch):
            idx = order[step * p.batch_size:(step + 1) * p.batch_size]
            y = _targets(self.train_m[idx], self.train_l[idx], self.aux)
            if p.augment:
                x, y = augment_batch(self.train_x[idx], y, p, aug_gen)
            else:
                x = self.train_x[idx].float().div_(255.0)
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            y = y.to(self.device)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(p, (epoch - 1) * steps_per_epoch + step, steps_per_epoch)
            with autocast(self.device, self.precision):
                logits = self.net(x)
            logits = logits.float()
            loss = _loss(logits, y, self.loss_fn, p)
            _check_finite(loss, epoch, step + 1)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.ema:
                self.ema.update(self.model)
            n = x.shape[0]
            loss_sum += loss.item() * n
            with torch.no_grad():
                diff = torch.sigmoid(logits[:, :1]) - y[:, :1]
                sse += float((diff * diff).sum())
            pixels += y[:, :1].numel()
            seen += n
            if ctx.is_main and ((step + 1) % report_every == 0 or step + 1 == steps_per_epoch):
                rate = seen / max(time.perf_counter() - start, 1e-9)
                print(f"  epoch {epoch} step {step + 1}/{steps_per_epoch} loss {loss_sum / seen:.4f} "
                      f"{rate * ctx.world_size:.1f} img/s", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - start
        loss_sum, sse, pixels, seen = ctx.all_sum([loss_sum, sse, pixels, seen])
        self.train_seconds += elapsed
        self.train_images += int(seen)
        return loss_sum / seen, math.sqrt(sse / pixels)

    def _val_epoch(self) -> dict[str, float]:
        ctx = self.ctx
        idx = np.arange(ctx.rank, len(self.val["images"]), ctx.world_size)  # each val image on one rank
        images, masks = self.val["images"][idx], self.val["masks"][idx]
        logits = predict_logits(self.eval_model, images, self.device, self.precision, batch_size=max(self.params.batch_size, 8))
        target = torch.from_numpy(masks).float()
        loss = float(self.loss_fn(logits[:, None], target)) * len(idx) if len(idx) else 0.0  # a rank may hold no val image
        s = val_scores(logits, masks)
        total = ctx.all_sum([loss, float(len(idx)), s["dice_sum"], s["iou_sum"], s["scored"], s["sse"], s["pixels"]])
        loss, n, dice_sum, iou_sum, scored, sse, pixels = total
        return {"val_loss": loss / n, "val_rmse": math.sqrt(sse / pixels),
                "val_dice": dice_sum / max(scored, 1), "val_iou": iou_sum / max(scored, 1)}

    # ----- the run ------------------------------------------------------------------------
    def run(self, curves_path: Path) -> None:
        p = self.params
        for epoch in range(self.start_epoch, p.epochs + 1):
            if p.patience and self.since_best >= p.patience:
                break
            start = time.perf_counter()
            train_loss, train_rmse = self._train_epoch(epoch)
            self.ctx.sync_buffers(self.model)  # same BatchNorm statistics on every rank before val and saving
            if self.ema:
                self.ctx.sync_buffers(self.ema.model)
            val = self._val_epoch()
            seconds = time.perf_counter() - start
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["val_loss"], "train_rmse": train_rmse,
                   "val_rmse": val["val_rmse"], "val_dice": val["val_dice"], "val_iou": val["val_iou"],
                   "lr": self.opt.param_groups[0]["lr"], "seconds": seconds}
            self.rows.append(row)
            if val["val_dice"] > self.best_score:
                self.best_score, self.best_epoch, self.since_best = val["val_dice"], epoch, 0
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.eval_model.state_dict().items()}
            else:
                self.since_best += 1
            mean_epoch = sum(r["seconds"] for r in self.rows[-3:]) / len(self.rows[-3:])
            if self.ctx.is_main:
                self.log(f"epoch {epoch}/{p.epochs} train_loss {train_loss:.4f} val_loss {val['val_loss']:.4f} "
                         f"val_rmse {val['val_rmse']:.4f} val_dice {val['val_dice']:.4f} "
                         f"({seconds:.0f}s, about {_format_time(mean_epoch * (p.epochs - epoch))} left)")
                write_curves(curves_path, self.rows)
            self._save_resume()
            if p.patience and self.since_best >= p.patience:
                self.log(f"early stop: val Dice has not improved for {p.patience} epochs (best {self.best_score:.4f} at epoch {self.best_epoch})")
                break

    def _calibrate(self) -> tuple[Calibration, dict]:
        """Choose on val: lung gating (with a lung head), then temperature, then threshold.

        Returns (the calibration, val scores with it). Gating is kept only if it raises mean
        per-image val Dice at its own tuned threshold.
        """
        best = None
        for gate in ((False, True) if self.aux else (False,)):
            logits = predict_logits(self.model, self.val["images"], self.device, self.precision,
                                    batch_size=max(self.params.batch_size, 8), flip_tta=self.params.flip_tta, lung_gate=gate)
            temperature = tune_temperature(logits, self.val["masks"]) if self.params.temperature_scaling else 1.0
            threshold = tune_threshold(logits, self.val["masks"], temperature)
            scores = val_scores(logits, self.val["masks"], threshold, temperature)
            dice = scores["dice_sum"] / max(scores["scored"], 1)
            if best is None or dice > best[0] + 1e-9:
                best = (dice, Calibration(threshold, temperature, gate, self.params.flip_tta), scores)
        return best[1], best[2]

    def finish(self, model_path: Path, metrics_path: Path) -> dict:
        """Restore the best epoch, choose lung gating, temperature and threshold on val, save model and metrics (rank 0)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        calibration, tuned = self._calibrate()
        chosen = dataclasses.asdict(calibration)
        summary = {
            "epochs_run": len(self.rows), "best_epoch": self.best_epoch,
            "val_dice_at_0.5": self.best_score, "val_dice_at_threshold": tuned["dice_sum"] / max(tuned["scored"], 1),
            "val_rmse": math.sqrt(tuned["sse"] / tuned["pixels"]),
            **chosen,
            "train_images_per_second": self.train_images / max(self.train_seconds, 1e-9),
            "train_seconds": self.train_seconds, "device": self.device.type, "precision": self.precision,
            "world_size": self.ctx.world_size,
        }
        if self.ctx.is_main:
            save_model(model_path, self.model, {
                **chosen, "size": int(self.train_x.shape[-1]), "best_epoch": self.best_epoch,
                "train_params": dataclasses.asdict(self.params), "seed": self.seed,
            })
            write_json(metrics_path, summary)
            self.resume_path.unlink(missing_ok=True)
            write_text(self.resume_path.with_name("STATUS"), f"complete: {len(self.rows)} epochs; no resume state kept\n")
        self.ctx.barrier()
        return summary


def write_curves(path: str | Path, rows: list[dict]) -> None:
    """Write the per-epoch curves as TSV (one row per epoch; columns CURVE_FIELDS)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def train(prepared_dir: str | Path, model_path: str | Path, resume_dir: str | Path, curves_path: str | Path,
          metrics_path: str | Path, params: TrainParams, seed: int, log=print) -> dict:
    """Train end to end; returns the summary written to ``metrics_path``."""
    ctx = DistContext.from_env()
    prepared_dir = Path(prepared_dir)
    trainer = Trainer(prepared_dir, Path(resume_dir), params, seed, ctx, log=log if ctx.is_main else (lambda *a: None))
    try:
        trainer.run(Path(curves_path))
        return trainer.finish(Path(model_path), Path(metrics_path))
    finally:
        ctx.close()
