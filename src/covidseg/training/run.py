"""The train stage's entry: one run, an ensemble of independent runs, or a teacher and its student.

- ``train.members`` = 1 and ``train.unlabeled`` = none: one :class:`~covidseg.training.loop.Trainer` run.
- ``train.members`` = K >= 2: K runs with the seeds ``seed``, ``seed + 1``, ..., ``seed + K - 1``, each
  selecting its own best epoch on val (with ``max_train_images``, all on the first seed's films); the saved model averages their probabilities
  (:class:`~covidseg.model.ensemble.UNetEnsemble`, one ONNX graph), and its lung gating, temperature,
  threshold and share interval are fitted on val for the ensemble as a whole. Member 1 is the
  ``members: 1`` model itself (same seed, same weights), so the ensemble adds to it.
- ``train.unlabeled`` = archive or rest_of_train: self-training (:mod:`covidseg.training.self_training`):
  a teacher trained on the labelled films pseudo-labels the unlabeled ones, and a student trained
  from scratch on both is the saved model.

A killed run continues: each finished member (and the teacher) is kept in ``resume_dir/<name>/done.pt``
until the run ends, and the run under way resumes from its own epoch state.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import cache
from pathlib import Path

import numpy as np
import torch

from covidseg.atomic import atomic_path, write_text
from covidseg.data.arrays import load_split
from covidseg.model.ensemble import UNetEnsemble
from covidseg.params import TrainParams
from covidseg.training.codehash import code_hash as _hash_sources
from covidseg.training.distributed import DistContext
from covidseg.training.loop import EpochHook, Trainer, write_curves
from covidseg.training.self_training import pseudo_label, reliable_subset

_LOG = logging.getLogger(__name__)


@cache
def run_code_hash() -> str:
    """SHA-256 of this module and every covidseg module it imports: a kept member is reused only under it."""
    here = Path(__file__).resolve()
    return _hash_sources(here, here.parents[2])


def _load_done(path: Path, fingerprint: str) -> dict | None:
    """A finished run kept by :func:`_save_done`, or None when absent, unreadable or from other code or data."""
    if not path.is_file():
        return None
    try:
        done = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a damaged kept run is trained again
        return None
    ok = isinstance(done, dict) and done.get("code_hash") == run_code_hash() and done.get("fingerprint") == fingerprint
    return done if ok else None


def _save_done(path: Path, trainer: Trainer, selected: tuple[torch.nn.Module, dict, int, float]) -> dict:
    """Keep a finished run's selected weights and facts (rank 0 writes); returns what was kept."""
    model, kept, best_epoch, score = selected
    done = {
        "code_hash": run_code_hash(),
        "fingerprint": trainer.fingerprint,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "kept": kept,
        "best_epoch": best_epoch,
        "score": score,
        "epochs_run": len(trainer.rows),
        "rows": list(trainer.rows),
        "train_seconds": trainer.train_seconds,
        "train_images": trainer.train_images,
    }
    if trainer.ctx.is_main:
        with atomic_path(path) as tmp:
            torch.save(done, tmp)
        trainer.resume_path.unlink(missing_ok=True)
    trainer.ctx.barrier()
    return done


def _finished_run(trainer: Trainer, done_path: Path, curves: Path, on_epoch_end: EpochHook | None) -> dict:
    """Train ``trainer`` to the end (or reuse its kept result) and return the kept result (see :func:`_save_done`)."""
    done = _load_done(done_path, trainer.fingerprint)
    if done is not None:
        trainer.log(f"resume: {done_path.parent.name} finished before; its kept weights are reused")
        return done
    trainer.run(curves, on_epoch_end)
    return _save_done(done_path, trainer, trainer.select_model())


def _single(prepared, model_path, resume_dir, curves, metrics, params, seed, log_path, on_epoch_end, ctx) -> dict:
    trainer = Trainer(prepared, resume_dir, params, seed, ctx)
    trainer.run(curves, on_epoch_end)
    return trainer.finish(model_path, metrics, log_path)


def _ensemble(prepared, model_path, resume_dir, curves, metrics, params, seed, log_path, on_epoch_end, ctx) -> dict:
    """K independent runs (seeds seed .. seed + K - 1) averaged; member 1's curves are the stage's curves."""
    k = params.members
    member_params = dataclasses.replace(params, members=1)
    first = Trainer(prepared, resume_dir / "member-1", member_params, seed, ctx)
    dones = [_finished_run(first, resume_dir / "member-1" / "done.pt", curves, on_epoch_end)]
    if first.ctx.is_main:
        write_curves(curves, dones[0]["rows"])  # also when member 1 was kept from before (DVC removed the file)
    for i in range(2, k + 1):
        first.log(f"ensemble: member {i} of {k} (seed {seed + i - 1})")
        trainer = Trainer(prepared, resume_dir / f"member-{i}", member_params, seed + i - 1, ctx, subset_seed=seed)
        folder = resume_dir / f"member-{i}"
        dones.append(_finished_run(trainer, folder / "done.pt", folder / "curves.tsv", on_epoch_end))
        del trainer
    ensemble = UNetEnsemble.from_state_dicts(first.model.config, [d["state_dict"] for d in dones])
    ensemble.to(first.device).to(memory_format=torch.channels_last)
    score = first.val_dice_at_half(ensemble)
    first.log(
        f"ensemble: {k} members, val_dice@0.5 {score:.4f} (members: "
        + ", ".join(f"{d['score']:.4f}" for d in dones)
        + ")"
    )
    kept = {
        "epochs_run": dones[0]["epochs_run"],  # member 1's, as its curves are the stage's
        "member_seeds": [seed + i for i in range(k)],
        "member_best_epochs": [d["best_epoch"] for d in dones],
        "member_val_dice_at_0.5": [d["score"] for d in dones],
    }
    facts = {
        "train_seconds": sum(d["train_seconds"] for d in dones),
        "member_train_seconds": [d["train_seconds"] for d in dones],
        "train_images_per_second": sum(d["train_images"] for d in dones)
        / max(sum(d["train_seconds"] for d in dones), 1e-9),
    }
    summary = first.finish(model_path, metrics, log_path, (ensemble, kept, dones[0]["best_epoch"], score), facts)
    _clear(resume_dir, [f"member-{i}" for i in range(1, k + 1)], ctx)
    return summary


def _unlabeled_films(prepared: Path, params: TrainParams, teacher: Trainer) -> dict[str, np.ndarray]:
    """The films self-training pseudo-labels: ``images``, ``lungs`` uint8 (M, 1, S, S), ``has_lung`` bool (M,).

    archive: the prepared ``unlabeled`` split (the archive's Lung Segmentation Data films, none equal to a
    labelled film). rest_of_train: the train films the labelled subset leaves out; their infection masks
    are dropped here and never reach training (a simulation of unlabeled films on a labelled source).
    """
    if params.unlabeled == "archive":
        path = prepared / "unlabeled.npz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found; train.unlabeled: archive needs data.unlabeled: true and a source with the "
                "archive's Lung Segmentation Data part"
            )
        films = load_split(prepared, "unlabeled")
    else:
        train = load_split(prepared, "train")
        rest = np.setdiff1d(np.arange(len(train["images"])), teacher.train_keep)
        films = {k: train[k][rest] for k in ("images", "lungs")}
        if "has_lung" in train:
            films["has_lung"] = train["has_lung"][rest]
    films.setdefault("has_lung", np.ones(len(films["images"]), dtype=bool))
    return {k: films[k] for k in ("images", "lungs", "has_lung")}


def _self_training(
    prepared, model_path, resume_dir, curves, metrics, params, seed, log_path, on_epoch_end, ctx
) -> dict:
    """Teacher on the labelled films, its most flip-stable pseudo-labels, then a student on both."""
    teacher_params = dataclasses.replace(params, unlabeled="none")
    teacher = Trainer(prepared, resume_dir / "teacher", teacher_params, seed, ctx)
    folder = resume_dir / "teacher"
    done = _finished_run(teacher, folder / "done.pt", folder / "curves.tsv", on_epoch_end)
    teacher.model.load_state_dict(done["state_dict"])  # a teacher with snapshots is not allowed (params)
    net = teacher.inference_model(teacher.model)
    calibration, tuned = teacher.calibrate(net)
    teacher_dice = tuned["dice_sum"] / max(tuned["scored"], 1)
    films = _unlabeled_films(prepared, params, teacher)
    masks, stability = pseudo_label(
        net, calibration, films["images"], teacher.device, teacher.precision, max(params.batch_size, 8)
    )
    keep = reliable_subset(stability, params.pseudo_keep)
    teacher.log(
        f"self-training: teacher val Dice {teacher_dice:.4f} at its threshold {calibration.threshold}; "
        f"{len(keep)} of {len(masks)} unlabeled films kept (flip stability >= {stability[keep].min():.3f})"
        if len(keep)
        else "self-training: no unlabeled film; the student learns from the labelled films only"
    )
    extra = {
        "images": films["images"][keep],
        "masks": masks[keep],
        "lungs": films["lungs"][keep],
        "has_lung": films["has_lung"][keep],
    }
    labelled = len(teacher.train_x)
    del teacher, net
    student = Trainer(prepared, resume_dir, params, seed, ctx, extra=extra)
    student.run(curves, on_epoch_end)
    selected = student.select_model()
    model, kept, best_epoch, score = selected
    kept = kept | {
        "labelled_images": labelled,
        "pseudo_labelled_images": int(len(keep)),
        "unlabeled_images": int(len(masks)),
        "teacher_val_dice": teacher_dice,
        "teacher_best_epoch": done["best_epoch"],
    }
    facts = {"teacher_train_seconds": done["train_seconds"]}
    summary = student.finish(model_path, metrics, log_path, (model, kept, best_epoch, score), facts)
    _clear(resume_dir, ["teacher"], ctx)
    return summary


def _clear(resume_dir: Path, names: list[str], ctx: DistContext) -> None:
    """Remove the kept runs of a finished stage (rank 0), leaving a STATUS line in each folder."""
    if ctx.is_main:
        for name in names:
            (resume_dir / name / "done.pt").unlink(missing_ok=True)
            (resume_dir / name / "state.pt").unlink(missing_ok=True)
            write_text(resume_dir / name / "STATUS", "complete: the stage finished; no kept run\n")
    ctx.barrier()


def train(
    prepared_dir: str | Path,
    model_path: str | Path,
    resume_dir: str | Path,
    curves_path: str | Path,
    metrics_path: str | Path,
    params: TrainParams,
    seed: int,
    log_path: str | Path | None = None,
    on_epoch_end: EpochHook | None = None,
) -> dict:
    """Train end to end; returns the metrics written to ``metrics_path`` merged with the run log.

    ``log_path`` (timings, device, precision, world size) defaults to ``train_log.json`` beside the model.
    ``on_epoch_end``: see :meth:`Trainer.run` (called for every run: each member, the teacher, the student).
    Progress goes to the ``covidseg.training`` loggers (rank 0 only; see :mod:`covidseg.logs`).
    """
    log_path = Path(model_path).with_name("train_log.json") if log_path is None else Path(log_path)
    ctx = DistContext.from_env()
    scheme = _ensemble if params.members > 1 else _self_training if params.unlabeled != "none" else _single
    try:
        return scheme(
            Path(prepared_dir),
            Path(model_path),
            Path(resume_dir),
            Path(curves_path),
            Path(metrics_path),
            params,
            seed,
            log_path,
            on_epoch_end,
            ctx,
        )
    finally:
        ctx.close()
