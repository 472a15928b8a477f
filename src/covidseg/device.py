"""Pick the device and the numeric precision from what the hardware supports, never from a timing.

bf16 autocast is only a win on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere it is
emulated and several times slower than fp32 (measured: 7x slower on an AVX2-only EPYC).
``auto`` therefore reads the CPU's feature flags (or asks CUDA) so that the same machine always
makes the same choice, however busy it is: the precision changes the results.

The probe can be overridden with ``COVIDSEG_NATIVE_BF16=1`` (or ``0``), so that both branches of
``auto`` run on any machine (torch runs bf16 on AVX2 too, only slowly): the tests use it, and so
can a user who wants an AVX2 machine to take the bf16 path (or a bf16 machine to stay in fp32).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
NATIVE_BF16_ENV = "COVIDSEG_NATIVE_BF16"  # "1" / "0": force the capability probe's answer
PRECISIONS = ("fp32", "bf16")
# The preset `make real` runs on each kind of machine (files in presets/; docs/results.md says why each).
MACHINE_PRESETS = {"cuda": "gpu.yaml", "cpu-bf16": "real-bf16.yaml", "cpu": "real.yaml"}


def choose_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU if any, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def _cpuinfo_flags() -> frozenset[str]:
    """The CPU feature flags of Linux's /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), unless ``COVIDSEG_NATIVE_BF16`` says otherwise.

    Raises ValueError when the variable holds anything but ``0`` or ``1``.
    """
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{NATIVE_BF16_ENV}={forced!r}: use 1 (the CPU has native bf16) or 0 (it has not)")
        return forced == "1"
    return probe_native_bf16()


@functools.cache
def probe_native_bf16() -> bool:
    """What the CPU itself says: torch's AVX512-BF16 probe, else the flags of /proc/cpuinfo."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        return True
    return bool(NATIVE_BF16_FLAGS & _cpuinfo_flags())


def choose_precision(device: torch.device, name: str = "auto") -> str:
    """``fp32`` or ``bf16``; ``auto`` picks bf16 on CUDA with bf16 support and on CPUs with native bf16."""
    if name != "auto":
        if name not in PRECISIONS:
            raise ValueError(f"precision {name!r}: choose auto, fp32 or bf16")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def machine_kind() -> str:
    """``cuda`` (a CUDA GPU), ``cpu-bf16`` (a CPU with native bf16) or ``cpu``: what sizes the preset."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu-bf16" if cpu_has_native_bf16() else "cpu"


def machine_preset() -> str:
    """The file name, in presets/, of the preset sized to this machine (:data:`MACHINE_PRESETS`)."""
    return MACHINE_PRESETS[machine_kind()]
