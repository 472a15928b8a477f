"""Save and load the trained model: weights plus everything needed to rebuild and use it.

A model file is a ``torch.save`` zip archive of one dict::

    format          "covidseg-model"
    format_version  FORMAT_VERSION
    config          the UNetConfig as a dict (of each member, for a snapshot ensemble)
    state_dict      CPU tensors
    lung_crop       (optional) True: the network runs as a lung-region cascade (covidseg.model.cascade)
    snapshots       K >= 2 only for a UNetEnsemble of K members (absent: one UNet)
    ...             e.g. threshold, temperature, size, provenance (see covidseg.training.loop)

Its bytes depend only on what is saved: it is serialised in memory (fixed record names;
``torch.save`` to a path would store the temporary file's name) and then written atomically.
Nothing in it may hold a timestamp, an absolute path or git state.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from covidseg.atomic import atomic_path
from covidseg.model.cascade import LungCascade
from covidseg.model.ensemble import UNetEnsemble
from covidseg.model.unet import UNet, UNetConfig

FORMAT = "covidseg-model"
FORMAT_VERSION = 2
_RETRAIN = "retrain it with `dvc repro train` using this covidseg version"


def save_model(path: str | Path, model: torch.nn.Module, extra: dict[str, Any]) -> None:
    """Atomically write ``{"format", "format_version", "config", "state_dict", **extra}``.

    ``extra`` holds e.g. threshold, temperature, size, provenance; plain values only.
    A :class:`UNetEnsemble` also gets ``"snapshots": K`` (a plain UNet's payload is unchanged).
    The same weights and ``extra`` give the same bytes, whatever ``path`` is.
    """
    net = getattr(model, "module", model)
    cascade = isinstance(net, LungCascade)
    net = net.net if cascade else net
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        **({"lung_crop": True} if cascade else {}),
    }
    if isinstance(net, UNetEnsemble):
        payload["snapshots"] = len(net.members)
    payload.update(extra)
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _read(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model file not found (run `dvc repro train` first)") from None
    except pickle.UnpicklingError:  # weights_only refused an object: not a file save_model wrote
        raise ValueError(
            f"{path}: not a covidseg model file (it holds Python objects, not plain values and "
            f"tensors); give the models/model.pt written by `dvc repro train`"
        ) from None
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(
            f"{path}: not a covidseg model file ({reason}); give the models/model.pt written by `dvc repro train`"
        ) from None
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise ValueError(
            f"{path}: not a covidseg model file (missing config or state_dict); "
            f"give the models/model.pt written by `dvc repro train`"
        )
    if payload.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path}: not a covidseg model file (format {payload.get('format')!r})")
    version = payload.get("format_version", 1)  # version 1 files had no format keys
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: model file format version {version}, this covidseg reads version {FORMAT_VERSION}; {_RETRAIN}"
        )
    return payload


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a file written by :func:`save_model`; returns (model in eval mode, metadata).

    The model is a :class:`UNetEnsemble` when the file says ``snapshots`` >= 2, else a UNet
    (files without the key are one UNet), inside a :class:`LungCascade` for a file with ``lung_crop``.
    ``metadata`` keeps ``snapshots`` when present.

    Raises FileNotFoundError, or ValueError naming the file and what to do for anything that is
    not a model file of this format version (including unknown config keys or mismatched weights).
    """
    path = Path(path)
    payload = _read(path)
    config = payload["config"]
    unknown = (
        sorted(set(config) - set(UNetConfig.__dataclass_fields__)) if isinstance(config, dict) else ["<not a dict>"]
    )
    if unknown:
        raise ValueError(f"{path}: unknown model config key(s) {', '.join(map(str, unknown))}; {_RETRAIN}")
    snapshots = payload.get("snapshots", 1)
    if isinstance(snapshots, bool) or not isinstance(snapshots, int) or snapshots < 1:
        raise ValueError(f"{path}: 'snapshots' must be an integer >= 1, got {snapshots!r}; {_RETRAIN}")
    try:
        model = UNet(UNetConfig(**config)) if snapshots == 1 else UNetEnsemble(UNetConfig(**config), snapshots)
        model.load_state_dict(payload["state_dict"])
        if payload.get("lung_crop", False):
            model = LungCascade(model)
    except (TypeError, ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(f"{path}: model config and weights do not fit ({reason}); {_RETRAIN}") from None
    model.to(device).to(memory_format=torch.channels_last).eval()
    meta = {
        k: v for k, v in payload.items() if k not in ("format", "format_version", "config", "state_dict", "lung_crop")
    }
    return model, meta
