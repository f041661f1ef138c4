"""The default dtype follows the CPU's flags, never a timing."""

import torch

from keel.engine import device


def _pick(monkeypatch, flags):
    monkeypatch.setattr(device, "_chosen", {})
    monkeypatch.setattr(device, "cpu_flags", lambda: set(flags))
    return device.default_dtype(torch.device("cpu"))


def test_plain_avx2_cpu_runs_float32(monkeypatch):
    assert _pick(monkeypatch, {"sse2", "avx2", "fma"}) == torch.float32


def test_bf16_instructions_run_bfloat16(monkeypatch):
    assert _pick(monkeypatch, {"avx2", "avx512f", "avx512_bf16"}) == torch.bfloat16
    assert _pick(monkeypatch, {"avx2", "amx_tile", "amx_bf16"}) == torch.bfloat16


def test_parse_dtype_auto_and_names():
    cpu = torch.device("cpu")
    assert device.parse_dtype("auto", cpu) == device.default_dtype(cpu)
    assert device.parse_dtype("bf16", cpu) == torch.bfloat16


def test_this_machine_flags_are_read():
    flags = device.cpu_flags()
    assert isinstance(flags, set)
    if open("/proc/cpuinfo").read().count("flags"):
        assert flags  # on Linux x86 the flags line is parsed
