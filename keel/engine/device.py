"""Device and default dtype."""

from __future__ import annotations

import torch

from keel.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


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
    """bfloat16 on GPUs that have it, else float16. On every CPU, float32: activations in bfloat16
    round every layer's output to 8 bits of mantissa, which changed greedy answers (a quantized
    SmolLM2 answered "What is the capital of France?" with nonsense in bf16, correctly in float32) and
    made seeded sampling depend on the batch. keel's CPU kernels read bfloat16 or quantized weights as
    stored and compute in float32, so the memory saving stays without the rounding; bfloat16
    activations are an opt-in (dtype="bfloat16"). The same on every CPU, so a model gives the same
    tokens on an AVX2 laptop and an AVX-512 server."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
