import time

import pytest
import torch

import covidseg.device as device_mod
from covidseg.device import choose_precision


def _no_clock():
    raise AssertionError("choose_precision must not time anything")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpu_capability_not_a_timing(monkeypatch, native, expected):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(time, "perf_counter", _no_clock)  # a busy (or idle) machine cannot change the choice
    assert choose_precision(torch.device("cpu"), "auto") == expected
    assert choose_precision(torch.device("cpu"), "fp32") == "fp32"


@pytest.mark.parametrize(
    "flags, expected", [({"avx2", "avx512_bf16"}, True), ({"amx_bf16"}, True), ({"avx2", "avx512f"}, False)]
)
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(device_mod, "_cpuinfo_flags", lambda: frozenset(flags))
    device_mod.cpu_has_native_bf16.cache_clear()
    try:
        assert device_mod.cpu_has_native_bf16() is expected
    finally:
        device_mod.cpu_has_native_bf16.cache_clear()
