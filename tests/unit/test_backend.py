"""keel.kernels.backend: one choice per engine, overridable, logged, and never a crash when keel's kernels
cannot run."""

from __future__ import annotations

import logging

import pytest
import torch

from keel.errors import InvalidRequestError
from keel.kernels import backend as bk
from keel.kernels import cpu

CPU = torch.device("cpu")


def test_torch_mode_uses_no_kernels():
    b = bk.choose(CPU, torch.float32, kernels="torch")
    assert b.cpu is None and b.isa is None and "PyTorch" in b.describe()


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("KEEL_KERNELS", "torch")
    assert bk.choose(CPU, torch.float32).cpu is None
    monkeypatch.delenv("KEEL_KERNELS")
    monkeypatch.setenv("KEEL_NO_CPU_KERNELS", "1")
    assert bk.choose(CPU, torch.float32).cpu is None


def test_bad_values_and_an_isa_this_cpu_lacks(monkeypatch):
    with pytest.raises(InvalidRequestError, match="kernels="):
        bk.choose(CPU, torch.float32, kernels="fast")
    with pytest.raises(InvalidRequestError, match="cpu_isa="):
        bk.choose(CPU, torch.float32, cpu_isa="neon")
    monkeypatch.setattr(cpu, "runnable_isas", lambda flags=None: ["avx2"])
    with pytest.raises(InvalidRequestError, match="avx512"):
        bk.choose(CPU, torch.float32, cpu_isa="avx512")


def test_isa_needs():
    assert cpu.runnable_isas({"avx2", "fma", "f16c"}) == ["avx2"]
    full = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    assert cpu.runnable_isas(full) == ["avx512", "avx2"]
    assert cpu.runnable_isas({"avx", "sse4_2"}) == []


def test_a_build_that_computes_wrong_numbers_is_not_used(monkeypatch, caplog):
    """A probe that disagrees with PyTorch (a miscompile, a CPU misreporting its flags): the next backend
    serves, and the log says why; forcing keel's kernels then is an error, not a crash at the first step."""
    if not cpu.runnable_isas():
        pytest.skip("this CPU runs none of keel's kernel builds")
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu, "probe", lambda k: "float32 matmul")
    with caplog.at_level(logging.WARNING, logger="keel.kernels"):
        b = bk.choose(CPU, torch.float32)
    assert b.cpu is None
    assert "wrong float32 matmul" in caplog.text and "PyTorch's operators serve" in caplog.text
    with pytest.raises(InvalidRequestError, match="kernels=keel"):
        bk.choose(CPU, torch.float32, kernels="keel")


def test_the_probe_passes_on_every_build_here():
    for isa in cpu.runnable_isas():
        k = cpu.kernels(isa)
        if k is not None:
            assert cpu.probe(k) is None and k.isa == isa


def test_records_and_digest():
    b = bk.Backend(CPU, torch.float32)
    b.record("linear.float32", "keel avx2")
    b.record("linear.float32", "keel avx2")
    b.record("linear.bfloat16", "keel avx2")
    b.record("attention", "torch sdpa")
    assert b.table() == {"attention": "torch sdpa", "linear.bfloat16": "keel avx2", "linear.float32": "keel avx2"}
    other = bk.Backend(CPU, torch.float32)
    other.record("linear.float32", "keel avx2")
    other.record("attention", "torch sdpa")
    assert other.digest() == b.digest()  # weights read exactly in another storage: the same arithmetic
    other.record("attention", "keel avx2 (every token)")
    assert other.digest() != b.digest()
    assert bk.Backend(CPU, torch.float32, batch_invariant=False).digest() != bk.Backend(CPU, torch.float32).digest()


def test_the_kernels_build_wherever_they_can():
    """Kernel tests skip where keel's C kernels cannot run; a build that breaks must not pass for that."""
    import os
    import shutil
    from keel.kernels.cpu import kernels, runnable_isas
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not (" avx2" in flags and " fma" in flags and compiler):
        pytest.skip("no AVX2 + FMA CPU with a C compiler here")
    for isa in runnable_isas():
        assert kernels(isa) is not None, f"keel's {isa} kernels did not build (see the log for the compiler's error)"
