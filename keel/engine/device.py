"""Device and default dtype."""

from __future__ import annotations

import time

import torch

from keel.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_measured: dict[str, torch.dtype] = {}


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


def matmul_seconds(dtype: torch.dtype, device: torch.device, rows: int, repeat: int = 20) -> float:
    """Time of a decoder-shaped matmul (rows tokens through a 1024 x 2816 projection)."""
    x = torch.randn(rows, 1024, dtype=dtype, device=device)
    w = torch.randn(2816, 1024, dtype=dtype, device=device)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for _ in range(repeat):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - t) / repeat


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that have it; on a CPU whichever of bfloat16 and float32 runs a decoder-shaped
    matmul faster at batch 1 and 16, measured once per process (about 50 ms): CPUs with AMX or
    AVX512-BF16 favour bfloat16, plain AVX2 ones float32 by a wide margin (bench/kernels.py, bench/results/kernels.md)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    key = str(device)
    if key not in _measured:
        cost = {dt: matmul_seconds(dt, device, 1) + matmul_seconds(dt, device, 16) / 4
                for dt in (torch.float32, torch.bfloat16)}
        _measured[key] = min(cost, key=cost.get)
    return _measured[key]
