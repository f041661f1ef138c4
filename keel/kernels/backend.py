"""Which implementation runs each layer kind, decided once when an engine is built.

A Backend is chosen from the device, the model dtype, the CPU's features and the user's overrides
(`--kernels`, `--cpu-isa`, KEEL_KERNELS, KEEL_CPU_ISA). The engine hands it to the model before the
weights are final (`model.prepare(backend)`); every layer takes its kernels from it and records what it
chose, so the log at start, `/metrics` and the fingerprint all say which code computes the answers.
Model files compose layers and never choose kernels themselves.

kernels: "auto" (keel's CPU kernels where they build and pass their probe, else PyTorch's operators,
said in the log), "keel" (keel's kernels or an error) or "torch" (PyTorch's operators only).
cpu_isa: "auto" (the best variant this CPU runs) or one of keel.kernels.cpu.ISA_FLAGS, an error where
the CPU cannot run it. Tests force each of them, whatever this machine would pick.

batch_invariant: every row of a step goes through the same arithmetic whatever else is in the step
(keel's matmul for any row count, the one attention kernel for decode and prefill tokens alike, LoRA on
its kernel for every slot), so a request's tokens and log-probabilities do not depend on its batch. Off,
large row counts go to oneDNN/MKL, which is faster for long prefills and not batch-invariant.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from keel.errors import InvalidRequestError

log = logging.getLogger("keel.kernels")
KERNEL_MODES = ("auto", "keel", "torch")
UNLIMITED = 1 << 62


@dataclass
class Backend:
    device: torch.device
    dtype: torch.dtype
    cpu: object | None = None  # keel.kernels.cpu.CPUKernels of the chosen ISA, or None: PyTorch's operators
    mode: str = "auto"
    batch_invariant: bool = True
    chosen: dict[str, Counter] = field(default_factory=dict)

    @property
    def isa(self) -> str | None:
        return None if self.cpu is None else self.cpu.isa

    def cpu_kernels(self, dtype: torch.dtype | None = None):
        """keel's CPU kernels where they serve tensors of `dtype` on this device, else None."""
        if self.cpu is None or self.device.type != "cpu":
            return None
        return self.cpu if dtype in (None, torch.float32) else None

    def max_rows(self, fast_limit: int) -> int:
        """Rows up to which one of keel's kernels serves a layer: all of them when batch-invariant."""
        return UNLIMITED if self.batch_invariant else fast_limit

    def record(self, kind: str, impl: str) -> None:
        self.chosen.setdefault(kind, Counter())[impl] += 1

    def table(self) -> dict[str, str]:
        """layer kind -> implementation (with counts where a kind is served by several)."""
        out = {}
        for kind in sorted(self.chosen):
            c = self.chosen[kind]
            out[kind] = ", ".join(f"{impl} x{n}" if len(c) > 1 else impl for impl, n in sorted(c.items()))
        return out

    def implementation(self) -> str:
        """Which kernels, e.g. "keel avx2 kernels, batch-invariant"."""
        return (f"keel {self.isa} kernels" if self.isa else "PyTorch's operators") + (
            ", batch-invariant" if self.batch_invariant else ", not batch-invariant")

    def describe(self) -> str:
        return f"{self.device.type}, {str(self.dtype).removeprefix('torch.')}, {self.implementation()}"

    def digest(self) -> str:
        """Part of the fingerprint: which implementations compute the answers (not how many layers of each,
        nor the storage of weights they read exactly: a bfloat16 weight widened is the same number)."""
        impls = sorted({impl for c in self.chosen.values() for impl in c})
        parts = [self.describe()] + impls
        return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def _env_choice(value: str | None, env: str, default: str = "auto") -> str:
    if value not in (None, "auto"):
        return value
    if env == "KEEL_KERNELS" and os.environ.get("KEEL_NO_CPU_KERNELS"):
        return "torch"
    return os.environ.get(env) or default


def choose(device: torch.device, dtype: torch.dtype, kernels: str | None = None, cpu_isa: str | None = None,
           batch_invariant: bool = True) -> Backend:
    """The backend of an engine on `device` computing in `dtype`; see the module docstring."""
    from keel.kernels import cpu
    mode = _env_choice(kernels, "KEEL_KERNELS")
    isa = _env_choice(cpu_isa, "KEEL_CPU_ISA")
    if mode not in KERNEL_MODES:
        raise InvalidRequestError(f"kernels={mode!r} is invalid: use one of {', '.join(KERNEL_MODES)}")
    if isa != "auto" and isa not in cpu.ISA_FLAGS:
        raise InvalidRequestError(f"cpu_isa={isa!r} is invalid: use auto or one of {', '.join(cpu.ISA_FLAGS)}")
    backend = Backend(device, dtype, None, mode, batch_invariant)
    if device.type != "cpu" or mode == "torch":
        return backend
    runnable = cpu.runnable_isas()
    if isa != "auto" and isa not in runnable:
        raise InvalidRequestError(f"cpu_isa={isa} needs CPU features this machine lacks "
                                  f"({', '.join(sorted(cpu.ISA_NEEDS[isa]))}); it runs: {', '.join(runnable) or 'none'}")
    for candidate in ([isa] if isa != "auto" else runnable):
        backend.cpu = cpu.kernels(candidate)
        if backend.cpu is not None:
            break
        log.warning("keel's %s kernels are unavailable here (see above): trying the next backend", candidate)
    if backend.cpu is None:
        if mode == "keel":
            raise InvalidRequestError("kernels=keel, but keel's CPU kernels cannot run here (see the log): use "
                                      "kernels=auto or torch")
        log.warning("keel's CPU kernels are off on this machine: PyTorch's operators serve every layer")
    return backend


_default: dict = {}


def default_backend(device: torch.device | str = "cpu") -> Backend:
    """The backend of layers used outside an engine (a test building one layer, a bench): auto choice."""
    key = str(device)
    if key not in _default:
        _default[key] = choose(torch.device(device), torch.float32)
    return _default[key]


def of(module) -> Backend:
    """The backend a layer was prepared with, or the default one."""
    b = getattr(module, "backend", None)
    if b is not None:
        return b
    try:
        dev = next(module.parameters()).device
    except (StopIteration, AttributeError):
        dev = torch.device("cpu")
    return default_backend(dev)
