"""Train the U-Net on the preprocessed train split, select on val, save the best model.

One readable loop: data held in memory as uint8 tensors (no decoding in the loop),
optional augmentation, fp32 or bf16 autocast with channels_last, optional weight
averaging (validated and kept instead of the raw weights), a per-epoch resume state
(``resume_dir/state.pt``), early stopping on val Dice at threshold 0.5 (``val_dice@0.5``),
and after training a threshold and a temperature tuned on val. Under ``torchrun`` it runs
DDP and only rank 0 writes.

Outputs: the model file (weights, calibration, provenance), the per-epoch curves (TSV,
deterministic columns only), the metrics JSON (deterministic headline numbers only, so a
rerun does not dirty git) and a run log JSON (timings, device, precision, world size).
A resume state is used only when params, data, the training code (every covidseg module
train imports) and the world size all match; otherwise training starts afresh and says why.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covidseg import __version__

from covidseg.evaluation import metrics
from covidseg.atomic import atomic_path, write_json, write_text
from covidseg.training.augment import augment_batch
from covidseg.device import autocast, choose_device, choose_precision
from covidseg.training.distributed import DistContext
from covidseg.training.averaging import WeightAverage
from covidseg.training.codehash import module_files
from covidseg.inference.forward import Calibration, predict_logits
from covidseg.model.losses import make_loss
from covidseg.model.unet import UNet, UNetConfig
from covidseg.model.checkpoint import save_model
from covidseg.params import TrainParams
from covidseg.data.arrays import load_source, load_split

# val_dice/val_iou at threshold 0.5; val_rmse of the uncalibrated probabilities (temperature 1).
CURVE_FIELDS = ["epoch", "train_loss", "val_loss", "train_rmse", "val_rmse", "val_dice", "val_iou", "lr"]
THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.025), 3)
TEMPERATURES = np.round(np.exp(np.linspace(np.log(0.1), np.log(10.0), 81)), 4)  # ratio 1.059 per step; includes 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@lru_cache(maxsize=None)
def code_hash() -> str:
    """SHA-256 of the source of covidseg.training.loop and of every covidseg module it imports (names relative to src/)."""
    here = Path(__file__).resolve()
    src_root = here.parents[2]  # src/ (this file is src/covidseg/training/loop.py)
    h = hashlib.sha256()
    for path in sorted(module_files(here, src_root) | {here}):
        h.update(path.relative_to(src_root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


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
    """Per-image mean Dice/IoU (empty-truth rule of :mod:`covidseg.evaluation.metrics`), and sums for RMSE.

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
    """Temperature T on TEMPERATURES minimising val BCE of sigmoid(logit / T) (Guo et al. 2017).

    A result at either end of the grid (0.1 or 10) means the optimum may lie beyond it: see
    :func:`at_grid_edge`.
    """
    sub = logits[:, ::3, ::3].reshape(-1).double()
    truth = torch.from_numpy(masks[:, 0, ::3, ::3].reshape(-1).astype(np.float64))
    losses = [F.binary_cross_entropy_with_logits(sub / t, truth).item() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def at_grid_edge(temperature: float) -> bool:
    """Whether a tuned temperature is the first or last grid value (the true optimum may lie outside)."""
    return temperature in (float(TEMPERATURES[0]), float(TEMPERATURES[-1]))


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
        self.source = load_source(prepared_dir)
        total = len(train["images"])
        if params.max_train_images and params.max_train_images < total:
            keep = np.sort(np.random.default_rng(seed).permutation(total)[: params.max_train_images])
            train = {k: v[keep] for k, v in train.items()}
            log(f"train: using {params.max_train_images} of {total} training images (train.max_train_images)")
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
        self.epoch_seconds: list[float] = []
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
            "fingerprint": self.fingerprint, "code_hash": code_hash(), "world_size": self.ctx.world_size,
            "epoch": len(self.rows), "rows": self.rows, "epoch_seconds": self.epoch_seconds,
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "best_score": self.best_score, "best_state": self.best_state, "best_epoch": self.best_epoch,
            "since_best": self.since_best, "train_seconds": self.train_seconds, "train_images": self.train_images,
        }

    def _save_resume(self) -> None:
        if self.ctx.is_main:
            with atomic_path(self.resume_path) as tmp:
                torch.save(self._state(), tmp)

    def _mismatch(self, state: dict) -> str | None:
        """Why a resume state cannot continue this run, or None when it can."""
        if state.get("code_hash") != code_hash():
            return "the training code changed (covidseg.training.loop or a module it imports)"
        if state.get("world_size") != self.ctx.world_size:
            return f"it was written with {state.get('world_size')} process(es), this run has {self.ctx.world_size}"
        if state.get("fingerprint") != self.fingerprint:
            return "it is from other params or data"
        return None

    def _maybe_resume(self) -> None:
        if not self.resume_path.exists():
            return
        try:
            state = torch.load(self.resume_path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a resume state")
        except Exception as exc:  # a damaged or foreign resume file is not fatal
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            self.log(f"resume: {self.resume_path} is unreadable ({reason}); starting afresh")
            return
        why = self._mismatch(state)
        if why:
            self.log(f"resume: not resuming from {self.resume_path}: {why}; starting afresh")
            return
        fresh = copy.deepcopy(self._state())  # to undo a partial load (state_dict() shares the live tensors)
        try:
            self._load_state(state)
        except Exception as exc:
            self._load_state(fresh)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            self.log(f"resume: {self.resume_path} does not fit this model ({reason}); starting afresh")
            return
        self.log(f"resume: continuing after epoch {state['epoch']} from {self.resume_path}")

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.rows, self.epoch_seconds = list(state["rows"]), list(state["epoch_seconds"])
        self.best_score, self.best_state, self.best_epoch = state["best_score"], state["best_state"], state["best_epoch"]
        self.since_best, self.train_seconds, self.train_images = state["since_best"], state["train_seconds"], state["train_images"]
        self.start_epoch = state["epoch"] + 1

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
                   "lr": self.opt.param_groups[0]["lr"]}
            self.rows.append(row)
            self.epoch_seconds.append(seconds)
            if val["val_dice"] > self.best_score:
                self.best_score, self.best_epoch, self.since_best = val["val_dice"], epoch, 0
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.eval_model.state_dict().items()}
            else:
                self.since_best += 1
            mean_epoch = sum(self.epoch_seconds[-3:]) / len(self.epoch_seconds[-3:])
            if self.ctx.is_main:
                self.log(f"epoch {epoch}/{p.epochs} train_loss {train_loss:.4f} val_loss {val['val_loss']:.4f} "
                         f"val_rmse {val['val_rmse']:.4f} val_dice@0.5 {val['val_dice']:.4f} "
                         f"({seconds:.0f}s, about {_format_time(mean_epoch * (p.epochs - epoch))} left)")
                write_curves(curves_path, self.rows)
            self._save_resume()
            if p.patience and self.since_best >= p.patience:
                self.log(f"early stop: val_dice@0.5 has not improved for {p.patience} epochs (best {self.best_score:.4f} at epoch {self.best_epoch})")
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
            if self.params.temperature_scaling and at_grid_edge(temperature):
                self.log(f"warning: the tuned temperature {temperature:g} is at the edge of its grid "
                         f"[{TEMPERATURES[0]:g}, {TEMPERATURES[-1]:g}]; the best value may lie outside, so val "
                         "probabilities stay miscalibrated (recorded as temperature_at_grid_edge in the metrics)")
            threshold = tune_threshold(logits, self.val["masks"], temperature)
            scores = val_scores(logits, self.val["masks"], threshold, temperature)
            dice = scores["dice_sum"] / max(scores["scored"], 1)
            if best is None or dice > best[0] + 1e-9:
                best = (dice, Calibration(threshold, temperature, gate, self.params.flip_tta), scores)
        return best[1], best[2]

    def finish(self, model_path: Path, metrics_path: Path, log_path: Path) -> dict:
        """Restore the best epoch, choose lung gating, temperature and threshold on val, save (rank 0).

        Writes the model file, ``metrics_path`` (deterministic headline numbers) and ``log_path``
        (timings and run facts). Returns both merged (metrics first).
        """
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.log(f"model: epoch {self.best_epoch} kept (best val_dice@0.5 {self.best_score:.4f}); "
                 "lung gating, temperature and threshold are then tuned on val")
        calibration, tuned = self._calibrate()
        chosen = dataclasses.asdict(calibration)
        val_dice = tuned["dice_sum"] / max(tuned["scored"], 1)
        summary = {
            "epochs_run": len(self.rows), "best_epoch": self.best_epoch, "train_images": int(len(self.train_x)),
            "val_dice_at_0.5": self.best_score, "val_dice_at_threshold": val_dice,
            "val_rmse": math.sqrt(tuned["sse"] / tuned["pixels"]),
            **chosen, "temperature_at_grid_edge": at_grid_edge(calibration.temperature),
        }
        run_log = {
            "train_seconds": self.train_seconds,
            "train_images_per_second": self.train_images / max(self.train_seconds, 1e-9),
            "epoch_seconds": list(self.epoch_seconds),
            "device": self.device.type, "precision": self.precision, "world_size": self.ctx.world_size,
        }
        if self.ctx.is_main:
            save_model(model_path, self.model, {
                **chosen, "size": int(self.train_x.shape[-1]), "best_epoch": self.best_epoch,
                "train_params": dataclasses.asdict(self.params), "seed": self.seed,
                "provenance": self._provenance(val_dice),
            })
            write_json(metrics_path, summary)
            write_json(log_path, run_log)
            self.resume_path.unlink(missing_ok=True)
            write_text(self.resume_path.with_name("STATUS"), f"complete: {len(self.rows)} epochs; no resume state kept\n")
        self.ctx.barrier()
        return summary | run_log

    def _provenance(self, val_dice: float) -> dict:
        """What the model was trained on and by which code: plain values, no paths, times or git state."""
        return {
            "data_source": str(self.source.get("data_source", "unknown")),
            "synthetic": bool(self.source.get("synthetic", False)),
            "split_counts": {k: int(v) for k, v in self.source.get("split_counts", {}).items()},
            "train_images": int(len(self.train_x)),
            "val_dice": float(val_dice),
            "package_version": __version__,
            "code_hash": code_hash(),
        }


def write_curves(path: str | Path, rows: list[dict]) -> None:
    """Write the per-epoch curves as TSV (one row per epoch; columns CURVE_FIELDS)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def train(prepared_dir: str | Path, model_path: str | Path, resume_dir: str | Path, curves_path: str | Path,
          metrics_path: str | Path, params: TrainParams, seed: int, log=print, log_path: str | Path | None = None) -> dict:
    """Train end to end; returns the metrics written to ``metrics_path`` merged with the run log.

    ``log_path`` (timings, device, precision, world size) defaults to ``train_log.json`` beside the model.
    """
    log_path = Path(model_path).with_name("train_log.json") if log_path is None else Path(log_path)
    ctx = DistContext.from_env()
    prepared_dir = Path(prepared_dir)
    trainer = Trainer(prepared_dir, Path(resume_dir), params, seed, ctx, log=log if ctx.is_main else (lambda *a: None))
    try:
        trainer.run(Path(curves_path))
        return trainer.finish(Path(model_path), Path(metrics_path), log_path)
    finally:
        ctx.close()
