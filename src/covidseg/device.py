"""Pick the device and the numeric precision that run fastest without losing accuracy.

bf16 autocast is only a win on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere it is
emulated and several times slower than fp32 (measured: 7x slower on an AVX2-only EPYC).
So ``auto`` times one small convolution both ways and keeps bf16 only if it is faster.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch


def choose_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU if any, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


@functools.lru_cache(maxsize=None)
def _cpu_bf16_is_faster() -> bool:
    x = torch.randn(8, 16, 128, 128).to(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(memory_format=torch.channels_last)

    def timed(bf16: bool) -> float:
        best = float("inf")
        with torch.no_grad():
            for _ in range(3):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    conv(x)
                best = min(best, time.perf_counter() - start)
        return best

    return timed(True) < 0.8 * timed(False)


def choose_precision(device: torch.device, name: str = "auto") -> str:
    """``fp32`` or ``bf16``; ``auto`` picks bf16 on CUDA with bf16 support and on CPUs where it is measurably faster."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_bf16_is_faster() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
