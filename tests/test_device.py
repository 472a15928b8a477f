"""covidseg.device: the precision comes from the hardware's capability (or its override), never from a timing.

Both branches of ``auto`` run on any machine: ``COVIDSEG_NATIVE_BF16`` forces the probe's answer
(torch computes bf16 on an AVX2-only CPU too, only slowly), so CI on either CPU kind covers both.
"""

import time

import pytest
import torch

import covidseg.device as device_mod
from covidseg.device import NATIVE_BF16_ENV, autocast, choose_precision, cpu_has_native_bf16


def _no_clock():
    raise AssertionError("choose_precision must not time anything")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpu_capability_not_a_timing(monkeypatch, native, expected):
    monkeypatch.setenv(NATIVE_BF16_ENV, "1" if native else "0")
    monkeypatch.setattr(time, "perf_counter", _no_clock)  # a busy (or idle) machine cannot change the choice
    assert choose_precision(torch.device("cpu"), "auto") == expected
    assert choose_precision(torch.device("cpu"), "fp32") == "fp32"
    assert choose_precision(torch.device("cpu"), "bf16") == "bf16"


@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_override_wins_over_what_the_cpu_says(monkeypatch, forced):
    monkeypatch.setattr(device_mod, "probe_native_bf16", lambda: forced == "0")  # the CPU says the opposite
    monkeypatch.setenv(NATIVE_BF16_ENV, forced)
    assert cpu_has_native_bf16() is (forced == "1")


def test_without_the_override_the_probe_decides(monkeypatch):
    monkeypatch.delenv(NATIVE_BF16_ENV, raising=False)
    for says in (True, False):
        monkeypatch.setattr(device_mod, "probe_native_bf16", lambda says=says: says)
        assert cpu_has_native_bf16() is says


def test_a_bad_override_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=r"COVIDSEG_NATIVE_BF16='yes': use 1 .* or 0"):
        cpu_has_native_bf16()


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision 'fp16': choose auto, fp32 or bf16"):
        choose_precision(torch.device("cpu"), "fp16")


@pytest.mark.parametrize(
    "flags, expected", [({"avx2", "avx512_bf16"}, True), ({"amx_bf16"}, True), ({"avx2", "avx512f"}, False)]
)
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.delenv(NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(device_mod, "_cpuinfo_flags", lambda: frozenset(flags))
    device_mod.probe_native_bf16.cache_clear()
    try:
        assert device_mod.cpu_has_native_bf16() is expected
    finally:
        device_mod.probe_native_bf16.cache_clear()


def test_bf16_autocast_runs_on_any_cpu_and_moves_the_numbers():
    """The bf16 branch is real on this machine whatever its kind: a tiny convolution in both precisions."""
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(1, 4, 3), torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        with autocast(torch.device("cpu"), "fp32"):
            fp32 = conv(x)
        with autocast(torch.device("cpu"), "bf16"):
            bf16 = conv(x)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert torch.allclose(fp32, bf16.float(), atol=0.05) and not torch.equal(fp32, bf16.float())
