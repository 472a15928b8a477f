"""One training run: train the U-Net on the preprocessed train split, select on val, save the best model.

:mod:`covidseg.training.run` is the train stage's entry: it runs one :class:`Trainer`, or several for
an ensemble of runs or a teacher and its student.

One readable loop: data held in memory as uint8 tensors (no decoding in the loop), optional
augmentation, fp32 or bf16 autocast with channels_last, optional weight averaging (validated and
kept instead of the raw weights) or a snapshot ensemble of the last K epochs' weights
(``train.snapshots``, kept instead of the best epoch), a per-epoch resume state
(``resume_dir/state.pt``), early stopping on val Dice at threshold 0.5 (``val_dice@0.5``), and
after training a lung gating, temperature and threshold fitted on val
(:func:`covidseg.training.calibration.fit_calibration`). Under ``torchrun`` it runs DDP and only
rank 0 writes. An optional end-of-epoch hook (``on_epoch_end``) sees each epoch's curve row and
can stop the run.

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
import logging
import math
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch

from covidseg import __version__
from covidseg.atomic import atomic_path, write_json, write_text
from covidseg.data.arrays import load_source, load_split, lung_flags
from covidseg.device import autocast, choose_device, choose_precision
from covidseg.inference.calibration import Calibration, calibrated_outputs
from covidseg.inference.forward import predict_logits
from covidseg.masks.share_interval import fit_from_predictions
from covidseg.model.cascade import LungCascade, crop_batch
from covidseg.model.checkpoint import save_model
from covidseg.model.ensemble import UNetEnsemble
from covidseg.model.losses import make_loss, segmentation_loss, training_targets
from covidseg.model.unet import UNet, UNetConfig
from covidseg.params import TrainParams
from covidseg.training.augment import augment_batch
from covidseg.training.averaging import WeightAverage
from covidseg.training.calibration import at_grid_edge, fit_calibration, val_scores
from covidseg.training.codehash import code_hash as _hash_sources
from covidseg.training.distributed import DistContext
from covidseg.training.selection import BestEpoch

_LOG = logging.getLogger(__name__)

# val_dice/val_iou at threshold 0.5; val_rmse of the uncalibrated probabilities (temperature 1).
CURVE_FIELDS = ["epoch", "train_loss", "val_loss", "train_rmse", "val_rmse", "val_dice", "val_iou", "lr"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@cache
def code_hash() -> str:
    """SHA-256 of the source of covidseg.training.loop and of every covidseg module it imports (names relative to src/)."""
    here = Path(__file__).resolve()
    return _hash_sources(here, here.parents[2])  # src/ (this file is src/covidseg/training/loop.py)


def _fingerprint(params: TrainParams, seed: int, arrays: dict[str, np.ndarray]) -> str:
    """Identifies a run: params, seed and the training/validation data."""
    h = hashlib.sha256(json.dumps([dataclasses.asdict(params), seed], sort_keys=True, default=str).encode())
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).data)
    return h.hexdigest()


def seeded_subset(total: int, n: int, seed: int) -> np.ndarray:
    """The sorted indices of the ``n`` of ``total`` train films that ``train.max_train_images`` keeps for ``seed``."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


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


def _check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"training stopped: loss is {loss.item()} at epoch {epoch}, step {step}; "
            "lower train.lr, or use train.precision=fp32"
        )


def _format_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


EpochHook = Callable[["Trainer", dict], "bool | None"]


class Trainer:
    """Holds the run's state; :meth:`run` trains, then :meth:`finish` selects and saves.

    Construction runs four steps in order: :meth:`_setup_device`, :meth:`_load_data`,
    :meth:`_build_model`, :meth:`_maybe_resume`.
    """

    def __init__(
        self,
        prepared_dir: Path,
        resume_dir: Path,
        params: TrainParams,
        seed: int,
        ctx: DistContext,
        extra: dict[str, np.ndarray] | None = None,
        subset_seed: int | None = None,
    ):
        """``extra``: more training films, appended to the train split (self-training's pseudo-labelled films):
        ``images``, ``masks``, ``lungs`` uint8 (M, 1, S, S) and ``has_lung`` bool (M,). ``subset_seed``: the seed
        that draws the ``max_train_images`` subset (default ``seed``; an ensemble's members share the first's)."""
        self.params, self.seed, self.ctx = params, seed, ctx
        self.subset_seed = seed if subset_seed is None else subset_seed
        self.resume_path = Path(resume_dir) / "state.pt"
        self._setup_device()
        self._load_data(Path(prepared_dir), extra)
        self._build_model()
        self.rows: list[dict] = []
        self.epoch_seconds: list[float] = []
        self.best, self.best_state = BestEpoch(), None
        self.snapshots: list[dict] = []  # CPU state_dicts of eval_model after the last train.snapshots epochs
        self.train_seconds, self.train_images = 0.0, 0
        self.start_epoch = 1
        self._maybe_resume()

    # ----- construction steps ---------------------------------------------------------------
    def log(self, message: str) -> None:
        """Progress for the user: the module logger at info level, on rank 0 only (the others would repeat it)."""
        if self.ctx.is_main:
            _LOG.info(message)

    def _setup_device(self) -> None:
        """Threads, device (this rank's GPU under DDP), precision, and the process group."""
        p, ctx = self.params, self.ctx
        if p.num_threads:
            torch.set_num_threads(p.num_threads)
        device = choose_device(p.device)
        if device.type == "cuda" and ctx.enabled:
            device = torch.device("cuda", ctx.local_rank)
        self.device = device
        self.precision = choose_precision(device, p.precision)
        ctx.init(device)
        if ctx.is_main:
            _LOG.debug(
                f"train: device {device}, precision {self.precision} (train.precision {p.precision}), "
                f"{torch.get_num_threads()} threads, world size {ctx.world_size}"
            )

    def _load_data(self, prepared_dir: Path, extra: dict[str, np.ndarray] | None = None) -> None:
        """Train/val arrays and the source record; the seeded train subset (``max_train_images``); the run fingerprint.

        Sets ``train_x``/``train_m``/``train_l`` (uint8 tensors (N, 1, S, S)), ``train_has_lung`` (bool (N,)),
        ``train_keep`` (int (N_labelled,): the train split's films used, labelled, before ``extra``), ``val``
        (dict of arrays) and ``fingerprint``. Raises ValueError naming ``prepared_dir`` when a split is empty.
        """
        p, seed = self.params, self.seed
        train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
        self.source = load_source(prepared_dir)
        total = len(train["images"])
        self.train_keep = np.arange(total)
        if p.max_train_images and p.max_train_images < total:
            self.train_keep = seeded_subset(total, p.max_train_images, self.subset_seed)
            train = {k: v[self.train_keep] for k, v in train.items()}
            self.log(f"train: using {p.max_train_images} of {total} training images (train.max_train_images)")
        if len(train["images"]) == 0 or len(val["images"]) == 0:
            raise ValueError(f"{prepared_dir}: train and val splits must not be empty")
        train = {k: train[k] for k in ("images", "masks", "lungs")} | {"has_lung": lung_flags(train)}
        if extra is not None:
            train = {k: np.concatenate([train[k], extra[k]]) for k in train}
        self.fingerprint = _fingerprint(
            p, seed, {f"train_{k}": train[k] for k in ("images", "masks")} | {"val": val["images"]}
        )
        self.train_x, self.train_m, self.train_l = (torch.from_numpy(train[k]) for k in ("images", "masks", "lungs"))
        self.train_has_lung = torch.from_numpy(train["has_lung"])
        with_lungs = int(self.train_has_lung.sum())
        if p.lung_aux_weight > 0 and with_lungs < len(self.train_x):
            self.log(
                f"train: {with_lungs} of {len(self.train_x)} training films have a lung mask; the lung head learns "
                "from those only"
                if with_lungs
                else "train: no training film has a lung mask, so the lung head is off (train.lung_aux_weight "
                "ignored): the model segments infection but gives no severity per lung"
            )
        self.val = val

    def _build_model(self) -> None:
        """The seeded U-Net (two outputs with the lung head), its DDP wrapper, weight average, optimiser and loss."""
        p, ctx, device = self.params, self.ctx, self.device
        self.aux = p.lung_aux_weight > 0 and bool(self.train_has_lung.any())
        if p.lung_crop and not self.aux:
            raise ValueError("train.lung_crop needs lung masks to train the lung head, and no training film has one")
        torch.manual_seed(self.seed)
        self.model = UNet(
            UNetConfig(
                out_channels=2 if self.aux else 1,
                base_channels=p.base_channels,
                depth=p.depth,
                downsample=p.downsample,
                attention=p.attention,
            )
        )
        self.model.to(device).to(memory_format=torch.channels_last)
        self.net = self.model
        if ctx.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.ema = WeightAverage(self.model, p.ema_decay) if p.ema_decay > 0 else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        self.loss_fn = make_loss(p)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation, best-epoch selection and saving use: the weight average when there is one."""
        return self.ema.model if self.ema else self.model

    def inference_model(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` as it predicts: wrapped in the two-pass lung-region cascade with ``train.lung_crop``."""
        return LungCascade(net) if self.params.lung_crop else net

    # ----- resume -------------------------------------------------------------------------
    def _state(self) -> dict:
        """Everything needed to continue after the last finished epoch (plain values and state_dicts)."""
        return {
            "fingerprint": self.fingerprint,
            "code_hash": code_hash(),
            "world_size": self.ctx.world_size,
            "epoch": len(self.rows),
            "rows": self.rows,
            "epoch_seconds": self.epoch_seconds,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "best_score": self.best.score,
            "best_state": self.best_state,
            "best_epoch": self.best.epoch,
            "since_best": self.best.since,
            "snapshots": self.snapshots,
            "train_seconds": self.train_seconds,
            "train_images": self.train_images,
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
        """Continue from ``resume_path`` when it matches this run (see :meth:`_mismatch`); otherwise log why not."""
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
        self.best = BestEpoch(state["best_score"], state["best_epoch"], state["since_best"])
        self.best_state = state["best_state"]
        self.snapshots = list(state["snapshots"])
        self.train_seconds, self.train_images = state["train_seconds"], state["train_images"]
        self.start_epoch = state["epoch"] + 1

    # ----- one epoch ----------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the (sharded) train set; returns (mean loss, pixel RMSE of the infection channel)."""
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
            idx = order[step * p.batch_size : (step + 1) * p.batch_size]
            y = training_targets(self.train_m[idx], self.train_l[idx], self.aux)
            if p.augment:
                x, y = augment_batch(self.train_x[idx], y, p, aug_gen)
            else:
                x = self.train_x[idx].float().div_(255.0)
            if p.lung_crop:
                x, y = crop_batch(x, y, aug_gen)
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            y = y.to(self.device)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(p, (epoch - 1) * steps_per_epoch + step, steps_per_epoch)
            with autocast(self.device, self.precision):
                logits = self.net(x)
            logits = logits.float()
            has_lung = self.train_has_lung[idx]
            lung_weight = None if bool(has_lung.all()) else has_lung.float().to(self.device)
            loss = segmentation_loss(logits, y, self.loss_fn, p.lung_aux_weight if self.aux else 0.0, lung_weight)
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
                self.log(
                    f"  epoch {epoch} step {step + 1}/{steps_per_epoch} loss {loss_sum / seen:.4f} "
                    f"{rate * ctx.world_size:.1f} img/s"
                )
        elapsed = time.perf_counter() - start
        loss_sum, sse, pixels, seen = ctx.all_sum([loss_sum, sse, pixels, seen])
        self.train_seconds += elapsed
        self.train_images += int(seen)
        return loss_sum / seen, math.sqrt(sse / pixels)

    def _val_epoch(self) -> dict[str, float]:
        """val_loss, val_rmse (temperature 1) and val_dice/val_iou at threshold 0.5 of :attr:`eval_model`, over all ranks."""
        ctx = self.ctx
        idx = np.arange(ctx.rank, len(self.val["images"]), ctx.world_size)  # each val image on one rank
        images, masks = self.val["images"][idx], self.val["masks"][idx]
        logits = predict_logits(
            self.inference_model(self.eval_model),
            images,
            self.device,
            self.precision,
            batch_size=max(self.params.batch_size, 8),
        )
        target = torch.from_numpy(masks).float()
        loss = (
            float(self.loss_fn(logits[:, None], target)) * len(idx) if len(idx) else 0.0
        )  # a rank may hold no val image
        s = val_scores(logits, masks)
        total = ctx.all_sum([loss, float(len(idx)), s["dice_sum"], s["iou_sum"], s["scored"], s["sse"], s["pixels"]])
        loss, n, dice_sum, iou_sum, scored, sse, pixels = total
        return {
            "val_loss": loss / n,
            "val_rmse": math.sqrt(sse / pixels),
            "val_dice": dice_sum / max(scored, 1),
            "val_iou": iou_sum / max(scored, 1),
        }

    # ----- the run ------------------------------------------------------------------------
    def run(self, curves_path: Path, on_epoch_end: EpochHook | None = None) -> None:
        """Train from :attr:`start_epoch` to ``params.epochs`` or until early stopping.

        ``on_epoch_end(trainer, row)`` is called after each epoch, once its curve row (CURVE_FIELDS:
        train and val scores) is recorded in ``trainer.rows`` and the resume state is saved, on every
        rank. Returning False ends training there (:meth:`finish` then selects as usual); an
        exception it raises propagates, leaving the resume state after that epoch (e.g.
        KeyboardInterrupt to simulate an interruption).
        """
        p = self.params
        for epoch in range(self.start_epoch, p.epochs + 1):
            if self.best.exhausted(p.patience):
                break
            start = time.perf_counter()
            train_loss, train_rmse = self._train_epoch(epoch)
            self.ctx.sync_buffers(self.model)  # same BatchNorm statistics on every rank before val and saving
            if self.ema:
                self.ctx.sync_buffers(self.ema.model)
            val = self._val_epoch()
            seconds = time.perf_counter() - start
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val["val_loss"],
                "train_rmse": train_rmse,
                "val_rmse": val["val_rmse"],
                "val_dice": val["val_dice"],
                "val_iou": val["val_iou"],
                "lr": self.opt.param_groups[0]["lr"],
            }
            self._end_epoch(row, seconds, curves_path)
            if on_epoch_end is not None and on_epoch_end(self, dict(row)) is False:
                self.log(f"stopped after epoch {epoch} by the end-of-epoch hook")
                break
            if self.best.exhausted(p.patience):
                self.log(
                    f"early stop: val_dice@0.5 has not improved for {p.patience} epochs "
                    f"(best {self.best.score:.4f} at epoch {self.best.epoch})"
                )
                break

    def _end_epoch(self, row: dict, seconds: float, curves_path: Path) -> None:
        """Record the row, keep the weights when val_dice@0.5 is a new best, log, write the curves and the resume state."""
        p, epoch = self.params, row["epoch"]
        self.rows.append(row)
        self.epoch_seconds.append(seconds)
        is_best = self.best.update(epoch, row["val_dice"])
        if is_best or p.snapshots > 1:
            # one CPU copy serves both: neither best_state nor a snapshot is changed in place
            weights = {k: v.detach().cpu().clone() for k, v in self.eval_model.state_dict().items()}
            if is_best:
                self.best_state = weights
            if p.snapshots > 1:
                self.snapshots.append(weights)
                del self.snapshots[: -p.snapshots]
        mean_epoch = sum(self.epoch_seconds[-3:]) / len(self.epoch_seconds[-3:])
        if self.ctx.is_main:
            _LOG.info(
                f"epoch {epoch}/{p.epochs} train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
                f"val_rmse {row['val_rmse']:.4f} val_dice@0.5 {row['val_dice']:.4f} "
                f"({seconds:.0f}s, about {_format_time(mean_epoch * (p.epochs - epoch))} left)"
            )
            write_curves(curves_path, self.rows)
        self._save_resume()

    def _snapshot_model(self) -> tuple[torch.nn.Module, list[int], float]:
        """With ``train.snapshots`` >= 2: (the model of the last K epochs' weights, those epochs, its val_dice@0.5).

        K kept weights give a :class:`UNetEnsemble`; a run stopped after one epoch gives that
        epoch's U-Net. The val Dice is the model's own (threshold 0.5, temperature 1).
        """
        epochs = [row["epoch"] for row in self.rows[-len(self.snapshots) :]]
        if len(self.snapshots) == 1:
            self.model.load_state_dict(self.snapshots[0])
            model = self.model
        else:
            model = UNetEnsemble.from_state_dicts(self.model.config, self.snapshots)
            model.to(self.device).to(memory_format=torch.channels_last)
        return model, epochs, self.val_dice_at_half(model)

    def val_dice_at_half(self, model: torch.nn.Module) -> float:
        """Per-image val Dice of ``model`` (as it predicts) at threshold 0.5 and temperature 1, without flips."""
        logits = predict_logits(
            self.inference_model(model),
            self.val["images"],
            self.device,
            self.precision,
            batch_size=max(self.params.batch_size, 8),
        )
        s = val_scores(logits, self.val["masks"])
        return s["dice_sum"] / max(s["scored"], 1)

    def select_model(self) -> tuple[torch.nn.Module, dict, int, float]:
        """The run's model before calibration: (model, extra metadata, best epoch, its val_dice@0.5).

        The best epoch's weights, or with ``train.snapshots`` = K >= 2 the ensemble of the last K epochs'
        weights (:meth:`_snapshot_model`): ``best_epoch`` is then the last of them and the metadata lists
        them all (``snapshot_epochs``). Not wrapped in the lung cascade (see :meth:`inference_model`).
        """
        p = self.params
        if p.snapshots > 1 and self.snapshots:
            model, epochs, best_score = self._snapshot_model()
            self.log(
                f"model: snapshot ensemble of epochs {epochs} kept instead of the best epoch "
                f"(train.snapshots {p.snapshots}; its val_dice@0.5 {best_score:.4f})"
            )
            return model, {"snapshot_epochs": epochs}, epochs[-1], best_score
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.log(f"model: epoch {self.best.epoch} kept (best val_dice@0.5 {self.best.score:.4f})")
        return self.model, {}, self.best.epoch, self.best.score

    def calibrate(self, model: torch.nn.Module) -> tuple[Calibration, dict]:
        """Lung gating, temperature and threshold of ``model`` (as it predicts) fitted on val, and its val sums."""
        p = self.params
        return fit_calibration(
            model,
            self.val["images"],
            self.val["masks"],
            self.device,
            self.precision,
            batch_size=max(p.batch_size, 8),
            flip_tta=p.flip_tta,
            temperature_scaling=p.temperature_scaling,
            with_lung_head=self.aux,
        )

    def finish(
        self,
        model_path: Path,
        metrics_path: Path,
        log_path: Path,
        selected: tuple[torch.nn.Module, dict, int, float] | None = None,
        run_facts: dict | None = None,
    ) -> dict:
        """Select the model (:meth:`select_model`, or ``selected``), tune calibration on val, save (rank 0).

        ``selected``: a model chosen elsewhere (an ensemble of runs), in :meth:`select_model`'s form; its
        metadata also goes to the metrics. ``run_facts``: more timings and counts for the run log.
        Writes the model file, ``metrics_path`` (deterministic headline numbers) and ``log_path``
        (timings and run facts). Returns both merged (metrics first).
        """
        model, kept, best_epoch, best_score = self.select_model() if selected is None else selected
        self.log("model: lung gating, temperature and threshold are tuned on val")
        model = self.inference_model(model)
        calibration, tuned = self.calibrate(model)
        chosen = dataclasses.asdict(calibration)
        share_interval = self._fit_share_interval(model, calibration) if self.aux else None
        val_dice = tuned["dice_sum"] / max(tuned["scored"], 1)
        summary = {
            "epochs_run": len(self.rows),
            "best_epoch": best_epoch,
            **kept,
            "train_images": int(len(self.train_x)),
            "val_dice_at_0.5": best_score,
            "val_dice_at_threshold": val_dice,
            "val_rmse": math.sqrt(tuned["sse"] / tuned["pixels"]),
            **chosen,
            "temperature_at_grid_edge": at_grid_edge(calibration.temperature),
            "share_interval_q": None if share_interval is None else share_interval["q"],
        }
        run_log = {
            "train_seconds": self.train_seconds,
            "train_images_per_second": self.train_images / max(self.train_seconds, 1e-9),
            "epoch_seconds": list(self.epoch_seconds),
            "device": self.device.type,
            "precision": self.precision,
            "world_size": self.ctx.world_size,
            **(run_facts or {}),
        }
        if self.ctx.is_main:
            save_model(
                model_path,
                model,
                {
                    **chosen,
                    "size": int(self.train_x.shape[-1]),
                    "best_epoch": best_epoch,
                    **kept,
                    "train_params": dataclasses.asdict(self.params),
                    "seed": self.seed,
                    "provenance": self._provenance(val_dice),
                    "contrast": str(self.source.get("contrast", "none")),  # predict applies it (data/contrast.py)
                    "train_precision": self.precision,  # the resolved value (fp32 / bf16), not "auto"
                    "share_interval": share_interval,  # covidseg.masks.share_interval, fitted on val
                },
            )
            write_json(metrics_path, summary)
            write_json(log_path, run_log)
            self.resume_path.unlink(missing_ok=True)
            write_text(
                self.resume_path.with_name("STATUS"), f"complete: {len(self.rows)} epochs; no resume state kept\n"
            )
        self.ctx.barrier()
        return summary | run_log

    def _fit_share_interval(self, model: torch.nn.Module, calibration: Calibration) -> dict | None:
        """The per-lung share interval (covidseg.masks.share_interval) fitted on the val films with a lung mask,
        as the model file stores it; None when too few val lungs have both a true and a predicted share."""
        val = self.val
        batch = max(self.params.batch_size, 8)
        prob, lung_prob = calibrated_outputs(model, val["images"], self.device, self.precision, calibration, batch)
        truth = (val["masks"][:, 0] > 0, val["lungs"][:, 0] > 0)
        fitted = fit_from_predictions(prob, lung_prob, calibration.threshold, *truth, lung_flags(val))
        if fitted is None:
            self.log("model: too few val lungs for a per-lung share interval; predictions will give none")
            return None
        self.log(
            f"model: per-lung share interval share -+ {fitted.q:.2f} x (spread + {fitted.offset:g}) points, "
            f"from {fitted.lungs} val lungs"
        )
        return fitted.to_meta()

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
