"""Helpers shared by several test modules: dataset and image writers, tiny models, tiny runs, DVC queries.

Test modules import from here (and from conftest), never from one another: tests/test_test_house.py
holds them to it. Every name is unique in this file, so a test reads the same thing wherever it uses it.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.evaluation.evaluate import evaluate
from covidseg.evaluation.figures import make_figures
from covidseg.model.checkpoint import save_model
from covidseg.model.unet import UNet, UNetConfig
from covidseg.params import EvaluateParams, PlotsParams, TrainParams
from covidseg.training.run import train

from conftest import REPO, dvc, set_params

# Pixels per side of the generated images and prepared arrays, and the tiny models' input size
# (divisible by 2 ** (depth - 1)).
TINY_SIZE = 32


# ---------------------------------------------------------------- the Kaggle layout (extract, sources, check)

KAGGLE_NEST = "Infection Segmentation Data/Infection Segmentation Data"  # the layout root inside the download
KAGGLE_SPLIT_DIRS = {"train": "Train", "val": "Val", "test": "Test"}
TRIPLET_KINDS = ("images", "infection masks", "lung masks")
DEV_PART_PER_SPLIT = 4  # COVID-19 triplets per split taken from the dev set for the zip tests (36 files)


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    """Write ``arr`` as a PNG (8-bit grey unless the array or ``mode`` says otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path, format="PNG")


def write_triplet(
    root: Path,
    split_dir: str,
    class_dir: str,
    name: str,
    seed: int,
    infected: bool | None = None,
    size: int = TINY_SIZE,
) -> dict[str, Path]:
    """One valid image / infection mask / lung mask triplet with pixels unique to ``seed``."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size), dtype=np.uint8)
    lung = np.zeros((size, size), np.uint8)
    lung[4:-4, 2:-2] = 255
    infection = np.zeros((size, size), np.uint8)
    if infected if infected is not None else class_dir == "COVID-19":
        infection[8:16, 6:14] = 255  # 64 of 1024 pixels at TINY_SIZE 32
    paths = {}
    for kind, arr in zip(TRIPLET_KINDS, (image, infection, lung)):
        paths[kind] = root / split_dir / class_dir / kind / name
        write_png(paths[kind], arr)
    return paths


def make_kaggle_dataset(base: Path, per_split: int = 2, negatives: int = 0, nest: str = KAGGLE_NEST) -> Path:
    """A tiny valid dataset in the Kaggle layout under ``base/nest``; returns the layout root.

    Each split gets ``per_split`` COVID-19 triplets ``covid_{k}.png`` and ``negatives``
    Non-COVID and Normal ones; every image has distinct pixels.
    """
    root = base / nest if nest else base
    seed = 0
    for split_dir in KAGGLE_SPLIT_DIRS.values():
        for _ in range(per_split):
            seed += 1
            write_triplet(root, split_dir, "COVID-19", f"covid_{seed}.png", seed)
        for class_dir, stem in (("Non-COVID", "non_COVID ({})"), ("Normal", "Normal ({})")):
            for _ in range(negatives):
                seed += 1
                write_triplet(root, split_dir, class_dir, stem.format(seed) + ".png", seed)
    return root


MANIFEST_FIELDS_IN = ["image", "mask", "lung_mask", "split", "class", "patient"]


def make_manifest_dataset(base: Path, per_split: int = 3, split: bool = True, size: int = TINY_SIZE) -> list[dict]:
    """A user's flat folder of films and masks with other names, and the rows of a manifest for it.

    Files: ``films/Patient {k} – film.png`` (a space and an en dash), every third film a 12-bit
    DICOM ``films/dicom ü {k}.dcm``; masks ``masks/{k} infection.png`` 0/255, every film's second
    one 0/1; lung masks ``masks/{k} lungs.png`` for the even films only. Rows: image, mask,
    lung_mask ("" without), split (when ``split``), class, patient; paths relative to ``base``.
    Nothing is written as a manifest: the caller writes CSV or JSON.
    """
    rows, k = [], 0
    for split_name in ("train", "val", "test"):
        for _ in range(per_split):
            k += 1
            rng = np.random.default_rng(k)
            image = rng.integers(0, 256, (size, size), dtype=np.uint8)
            infection = np.zeros((size, size), np.uint8)
            infection[8:16, 6:14] = 1 if k % 2 == 0 else 255
            lung = np.zeros((size, size), np.uint8)
            lung[4:-4, 2 : size // 2 - 2] = lung[4:-4, size // 2 + 2 : -2] = 255  # two lungs
            if k % 3 == 0:
                film = f"films/dicom ü {k}.dcm"
                (base / "films").mkdir(parents=True, exist_ok=True)
                write_dicom(base / film, image.astype(np.uint16) * 16, bits_stored=12)
            else:
                film = f"films/Patient {k} – film.png"
                write_png(base / film, image)
            write_png(base / f"masks/{k} infection.png", infection)
            lung_rel = ""
            if k % 2 == 0:
                lung_rel = f"masks/{k} lungs.png"
                write_png(base / lung_rel, lung)
            row = {"image": film, "mask": f"masks/{k} infection.png", "lung_mask": lung_rel, "class": "COVID-19"}
            rows.append(row | {"patient": f"p{k}"} | ({"split": split_name} if split else {}))
    return rows


def write_manifest_csv(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a manifest CSV (the columns of the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def dev_part_files(
    dev_data: Path, classes=("COVID-19", "Normal"), per_split: int = DEV_PART_PER_SPLIT
) -> dict[str, Path]:
    """A few dozen real files: layout path below the root (``Train/COVID-19/images/x.png``) -> file."""
    files = {}
    for split_dir in ("Train", "Val", "Test"):
        for class_dir in classes:
            names = sorted(p.name for p in (dev_data / KAGGLE_NEST / split_dir / class_dir / "images").iterdir())[
                :per_split
            ]
            for kind in ("images", "infection masks", "lung masks"):
                for name in names:
                    files[f"{split_dir}/{class_dir}/{kind}/{name}"] = (
                        dev_data / KAGGLE_NEST / split_dir / class_dir / kind / name
                    )
    return files


def read_csv_rows(path: Path) -> list[dict]:
    """The rows of a CSV file as dicts (header -> string)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def snapshot_files(work: Path) -> dict[str, bytes]:
    """Every file under ``work`` (relative path -> bytes), hidden temporaries included."""
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- DICOM files

DICOM_UID = "1.2.826.0.1.3680043.8.498.1"  # the SOP instance UID write_dicom gives every file


def write_dicom(
    path: Path, pixels: np.ndarray | None, bits_stored: int = 8, photometric: str = "MONOCHROME2", **attrs
) -> Path:
    """Write a minimal single-frame greyscale DICOM file; ``attrs`` set extra elements (WindowCenter, ...)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = DICOM_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = DICOM_UID
    ds.Modality = "CR"
    if pixels is not None:
        pixels = np.asarray(pixels)
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- `covidseg predict`: inputs, a tiny model, the CLI

FAST_PREDICT_FLAGS = ["--device", "cpu", "--precision", "fp32"]
_PREDICT_RUNNER = CliRunner()


def make_predict_model(
    path: Path,
    bias: float | None = None,
    threshold: float | None = 0.5,
    temperature: float = 1.0,
    seed: int = 0,
    flip_tta: bool | None = None,
) -> Path:
    """A tiny U-Net saved like train does; with ``bias`` its logits are that constant everywhere."""
    torch.manual_seed(seed)
    net = UNet(UNetConfig(base_channels=4, depth=2))
    if bias is not None:
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.fill_(bias)
    extra = {"temperature": temperature, "size": TINY_SIZE}
    if threshold is not None:
        extra["threshold"] = threshold
    if flip_tta is not None:
        extra["flip_tta"] = flip_tta
    save_model(path, net.eval(), extra)
    return path


def make_lung_head_model(path: Path, **meta) -> Path:
    """A tiny U-Net with a lung head whose (scaled-up) outputs give masks with both classes, threshold 0.45,
    size 32; ``meta`` adds to what the file records (e.g. provenance)."""
    torch.manual_seed(3)
    net = UNet(UNetConfig(base_channels=4, depth=2, out_channels=2)).eval()
    with torch.no_grad():
        net.head.weight.mul_(100.0)
        net.head.bias.copy_(torch.tensor([0.0, 1.0]))
    save_model(path, net, {"threshold": 0.45, "size": 32, **meta})
    return path


def grey_array(w: int, h: int, seed: int = 0) -> np.ndarray:
    """uint8 (h, w): a smooth gradient plus noise, so resizing and the model see structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 40 + 150 * (xx / max(w - 1, 1)) * (0.5 + 0.5 * yy / max(h - 1, 1))
    return np.clip(base + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)


def save_image(path: Path, kind: str, w: int, h: int, seed: int = 0) -> Path:
    """Write a ``kind`` image (grey, rgb, rgba, grey16, palette, jpeg) of w x h pixels."""
    g = grey_array(w, h, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "grey":
        img = Image.fromarray(g)
    elif kind == "rgb":
        img = Image.fromarray(np.stack([g, np.roll(g, 3, 1), 255 - g], axis=2))
    elif kind == "rgba":
        img = Image.fromarray(np.stack([g, g, g, np.full_like(g, 200)], axis=2))
    elif kind == "grey16":
        img = Image.fromarray(g.astype(np.uint16) * 257)
    elif kind == "palette":
        img = Image.fromarray(g).convert("P")
    elif kind == "jpeg":
        Image.fromarray(np.stack([g, g, g], axis=2)).save(path, format="JPEG", quality=90)
        return path
    else:
        raise ValueError(kind)
    img.save(path, format="PNG")
    return path


def invoke_predict(*args: str):
    """Run `covidseg predict ARGS` in-process (Typer's CliRunner); returns its Result."""
    return _PREDICT_RUNNER.invoke(app, ["predict", *map(str, args)])


# ---------------------------------------------------------------- training

TINY_TRAIN = TrainParams(
    epochs=3,
    batch_size=4,
    base_channels=4,
    depth=3,
    downsample=1,
    lr=1e-3,
    augment=True,
    lung_aux_weight=0.5,
    loss="bce_dice",
    temperature_scaling=False,
    precision="fp32",  # the independent references in the tests are fp32
)


def train_tiny(prepared, out, params=TINY_TRAIN, seed=0, on_epoch_end=None):
    """train() on ``prepared`` with every output under ``out`` (model.pt, resume/, curves.tsv, train.json).

    Its log lines go to the ``covidseg`` loggers: read them with :func:`log_lines` and pytest's ``caplog``."""
    return train(
        prepared,
        out / "model.pt",
        out / "resume",
        out / "curves.tsv",
        out / "train.json",
        params,
        seed,
        on_epoch_end=on_epoch_end,
    )


def interrupt_after(last_epoch):
    """An end-of-epoch hook that raises KeyboardInterrupt (as Ctrl-C would) once ``last_epoch`` is finished and saved."""

    def hook(trainer, row):
        if row["epoch"] == last_epoch:
            raise KeyboardInterrupt

    return hook


# ---------------------------------------------------------------- evaluation and figures

EVAL_TUNED_THRESHOLD = 0.45  # the 'tuned' threshold make_eval_model records


def _prepared_split(rng: np.random.Generator, n_covid: int, n_negative: int) -> dict[str, np.ndarray]:
    """One split in preprocess.py's format: COVID-19 images with a bright square lesion, negatives empty."""
    n = n_covid + n_negative
    images = rng.integers(40, 120, size=(n, 1, TINY_SIZE, TINY_SIZE), dtype=np.uint8)
    masks = np.zeros((n, 1, TINY_SIZE, TINY_SIZE), np.uint8)
    lungs = np.zeros((n, 1, TINY_SIZE, TINY_SIZE), np.uint8)
    lungs[:, 0, 6:26, 4:14] = 1
    lungs[:, 0, 6:26, 18:28] = 1
    for i in range(n_covid):
        r, c = 8 + 2 * (i % 4), 5 + (i % 3)
        masks[i, 0, r : r + 6, c : c + 6] = 1
        images[i, 0][masks[i, 0] > 0] = 220
    ids = [f"covid_{i + 1}" for i in range(n_covid)] + [f"Non_COVID ({i + 1})" for i in range(n_negative)]
    classes = ["COVID-19"] * n_covid + ["Non-COVID"] * n_negative
    return {
        "images": images,
        "masks": masks,
        "lungs": lungs,
        "ids": np.array(ids, dtype=str),
        "classes": np.array(classes, dtype=str),
    }


def make_eval_prepared(root: Path, n_test_covid: int = 3, n_test_negative: int = 1) -> Path:
    """A prepared dir (train/val/test .npz, 32x32) with ``n_test_negative`` empty-truth test images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, (nc, nn) in {"train": (4, 0), "val": (2, 0), "test": (n_test_covid, n_test_negative)}.items():
        np.savez(root / f"{split}.npz", **_prepared_split(rng, nc, nn))
    return root


def make_eval_model(path: Path, threshold: float = EVAL_TUNED_THRESHOLD) -> Path:
    """A tiny untrained U-Net saved as training would save it (with a 'tuned' threshold)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=4, depth=2))
    save_model(path, model, {"threshold": threshold, "temperature": 1.0, "size": TINY_SIZE})
    return path


def run_evaluate(root: Path, **prepared_kw) -> dict:
    """Evaluate a tiny model on a tiny prepared dir under ``root``; returns the paths and the summary."""
    prepared = make_eval_prepared(root / "prepared", **prepared_kw)
    model = make_eval_model(root / "model.pt")
    paths = {
        "model": model,
        "prepared": prepared,
        "metrics": root / "metrics" / "test.json",
        "details": root / "metrics" / "test_details.json",
        "per_image": root / "eval" / "per_image.csv",
        "eval": root / "eval",
        "predictions": root / "predictions" / "test.npz",
    }
    summary = evaluate(
        paths["model"],
        paths["prepared"],
        paths["metrics"],
        paths["per_image"],
        paths["eval"],
        paths["predictions"],
        EvaluateParams(precision="fp32"),  # the independent references in the tests are fp32
    )
    return {**paths, "summary": summary}


def write_train_curves(path: Path, epochs: int = 3) -> Path:
    """A curves.tsv as training writes it (the columns the figures read)."""
    e = np.arange(1, epochs + 1)
    frame = pd.DataFrame(
        {
            "epoch": e,
            "train_loss": 0.7 / e,
            "val_loss": 0.75 / e,
            "train_rmse": 0.45 / e,
            "val_rmse": 0.5 / e,
            "val_dice": 0.2 * e,
            "val_iou": 0.1 * e,
            "lr": 1e-4,
            "seconds": 1.0,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False)
    return path


def run_figures(root: Path) -> dict:
    """Evaluate a tiny model, then draw every figure; returns the paths and the list written."""
    ev = run_evaluate(root)
    curves = write_train_curves(root / "train" / "curves.tsv")
    out = root / "figures"
    written = make_figures(
        ev["prepared"],
        ev["predictions"],
        curves,
        ev["eval"],
        ev["per_image"],
        out,
        PlotsParams(gallery_size=2, dpi=50),
        metrics_json=ev["details"],
    )
    return {**ev, "curves": curves, "figures": out, "written": written}


# ---------------------------------------------------------------- the model card's inputs

CARD_TEST_METRICS = {"n_images": 10, "rmse_ci95_low": 0.11, "rmse_ci95_high": 0.14, "rmse": 0.1234567, "dice": 0.7654321, "iou": 0.6543210, "threshold": 0.45,
        "dice_at_threshold": 0.77}  # fmt: skip
CARD_TEST_DETAILS = {
    "severity": {
        "model": {
            "lung_dice": 0.95,
            "share_mae": 9.87,
            "share_mae_ci95_low": 7.11,
            "share_mae_ci95_high": 12.34,
            "share_bias": 8.76,
            "extent_kappa": 0.612,
        },  # fmt: skip
        "oracle_true_lungs": {"share_mae": 5.5},
        "baseline_constant_share": {"share_mae": 15.5},
    },
    "by_class": {
        "COVID-19": {
            "n_images": 5,
            "rmse": 0.2,
            "dice": 0.7,
            "iou": 0.6,
            "empty_truth_images": 0,
            "empty_truth_false_positive_images": 0,
        },  # fmt: skip
        "Normal": {
            "n_images": 5,
            "rmse": 0.05,
            "dice": 0.0,
            "iou": 0.0,
            "empty_truth_images": 5,
            "empty_truth_false_positive_images": 3,
        },  # fmt: skip
    },
}


def write_card_per_image(tmp_path):
    """A per_image.csv of 5 COVID-19 and 5 Normal test images for the model card; returns its path."""
    # COVID-19 true fractions 0.01..0.05: the smallest fifth is the 0.01 image, predicted 0.02 -> 2.00 times.
    rows = ["id,class,true_fraction,pred_fraction"]
    rows += [f"c{i},COVID-19,{0.01 * i},{0.02 if i == 1 else 0.01 * i}" for i in range(1, 6)]
    rows += [f"n{i},Normal,0,0.001" for i in range(5)]
    path = tmp_path / "per_image.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def copy_repo_params(tmp_path, overrides=None):
    """The project's params.yaml copied into ``tmp_path`` with ``overrides`` deep-merged; returns its path."""
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    if overrides:
        set_params(tmp_path, overrides)
    return path


# ---------------------------------------------------------------- DVC experiments


def dvc_experiments(repo) -> dict[str, dict]:
    """{name: data} of the experiments in `dvc exp show --json` (DVC 3 layout)."""
    found = {}
    for baseline in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = rev
    return found


def wait_for_dvc_queue(repo, timeout: float = 400) -> str:
    """Poll `dvc queue status` until nothing is queued or running; returns the last status (fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        status = dvc(repo, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout}s:\n{status}"
        time.sleep(3)


def log_lines(caplog, level: int = logging.INFO) -> list[str]:
    """The messages the ``covidseg`` loggers emitted at ``level`` or above since ``caplog`` started capturing them.

    Call ``caplog.set_level(logging.INFO, logger="covidseg")`` (or :func:`capture_logs`) first.
    """
    return [r.getMessage() for r in caplog.records if r.name.startswith("covidseg") and r.levelno >= level]


def capture_logs(caplog, level: int = logging.INFO):
    """Capture the ``covidseg`` loggers at ``level`` and up; returns ``caplog``."""
    caplog.set_level(level, logger="covidseg")
    return caplog
