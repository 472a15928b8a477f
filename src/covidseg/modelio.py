"""Save and load the trained model: weights plus everything needed to rebuild and use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from covidseg.atomic import atomic_path
from covidseg.model import UNet, UNetConfig


def save_model(path: str | Path, model: torch.nn.Module, extra: dict[str, Any]) -> None:
    """Atomically write ``{"config", "state_dict", **extra}``; ``extra`` holds e.g. threshold, temperature, size."""
    net = getattr(model, "module", model)
    payload = {"config": net.config.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, dict[str, Any]]:
    """Rebuild the U-Net from a file written by :func:`save_model`; returns (model in eval mode, metadata)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model file not found (run `dvc repro train` first)") from None
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ValueError(f"{path}: not a covidseg model file ({exc})") from None
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path}: not a covidseg model file (missing config or state_dict)")
    model = UNet(UNetConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.to(device).to(memory_format=torch.channels_last).eval()
    meta = {k: v for k, v in payload.items() if k not in ("config", "state_dict")}
    return model, meta
