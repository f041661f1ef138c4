"""Device and default dtype."""

from __future__ import annotations

import torch

from keel.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_chosen: dict[str, torch.dtype] = {}


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if dtype not in _DTYPES:
        raise InvalidRequestError(f"dtype={dtype!r} is invalid: use one of auto, {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[dtype]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Flags of CPUs whose bfloat16 matmuls beat float32 ones (AMX tiles, AVX512-BF16 dot products).
BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that have it, else float16. On a CPU, bfloat16 where it has bfloat16 matmul
    instructions (AMX, AVX512-BF16), else float32: on a plain AVX2 CPU bf16 F.linear is 1.3x slower at
    one row and 4-7x slower at 16 (bench/results/kernels.md). Decided by the CPU's flags, never by a
    timing, so the same machine always runs the same dtype and gives the same tokens, under any load."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    key = str(device)
    if key not in _chosen:
        _chosen[key] = torch.bfloat16 if cpu_flags() & BF16_CPU_FLAGS else torch.float32
    return _chosen[key]
