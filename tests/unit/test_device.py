"""The default dtype on a CPU is float32 whatever its flags: exact by default, the same tokens on every
CPU; never chosen by a timing."""

import torch

from keel.engine import device


def _pick(monkeypatch, flags):
    monkeypatch.setattr(device, "cpu_flags", lambda: set(flags))
    return device.default_dtype(torch.device("cpu"))


def test_plain_avx2_cpu_runs_float32(monkeypatch):
    assert _pick(monkeypatch, {"sse2", "avx2", "fma"}) == torch.float32


def test_bf16_instructions_still_run_float32(monkeypatch):
    """An AVX512-BF16 or AMX CPU used to default to bfloat16, which changed greedy answers: now opt-in."""
    assert _pick(monkeypatch, {"avx2", "avx512f", "avx512_bf16"}) == torch.float32
    assert _pick(monkeypatch, {"avx2", "amx_tile", "amx_bf16"}) == torch.float32


def test_parse_dtype_auto_and_names():
    cpu = torch.device("cpu")
    assert device.parse_dtype("auto", cpu) == device.default_dtype(cpu)
    assert device.parse_dtype("bf16", cpu) == torch.bfloat16


def test_this_machine_flags_are_read():
    flags = device.cpu_flags()
    assert isinstance(flags, set)
    if open("/proc/cpuinfo").read().count("flags"):
        assert flags  # on Linux x86 the flags line is parsed
