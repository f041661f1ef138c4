"""How much memory the KV cache gets when the user does not say (CacheConfig.kv_cache_memory_gb None)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("keel")
# On a CPU the cache shares RAM with everything else on the machine: a tenth of what is available once
# the weights are loaded, between MIN_CPU_BYTES and MAX_CPU_BYTES (vLLM's CPU default is 4 GiB); it is
# also capped by what max_num_seqs full contexts need, so a small model with short contexts takes less.
CPU_SHARE = 0.1
MIN_CPU_BYTES = 256 << 20
MAX_CPU_BYTES = 4 << 30


def available_cpu_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def kv_cache_bytes(cache, device: torch.device) -> tuple[int, str]:
    """(bytes for the KV cache, how that was decided), called once the weights are loaded."""
    if cache.kv_cache_memory_gb is not None:
        return int(cache.kv_cache_memory_gb * 2**30), f"--kv-cache-memory {cache.kv_cache_memory_gb:g} GiB"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * cache.gpu_memory_utilization) - used
        if budget <= 0:
            from keel.errors import ModelLoadError
            raise ModelLoadError(f"no GPU memory left for the KV cache: {used / 2**30:.1f} GiB of {total / 2**30:.1f} "
                                 f"in use, gpu_memory_utilization {cache.gpu_memory_utilization}")
        return budget, f"{cache.gpu_memory_utilization:g} of the GPU's {total / 2**30:.1f} GiB"
    avail = available_cpu_bytes()
    if avail is None:
        return 1 << 30, "1 GiB (available memory unknown)"
    share = min(MAX_CPU_BYTES, max(MIN_CPU_BYTES, int(avail * CPU_SHARE)))
    return share, f"auto: {CPU_SHARE:g} of {avail / 2**30:.1f} GiB available, within 0.25-4 GiB"


def kv_cache_blocks(cache, max_num_seqs: int, max_len: int, per_token: int, device: torch.device) -> tuple[int, str]:
    """(KV blocks, how the number was decided): cache.num_blocks where given, else the memory budget
    (kv_cache_bytes), capped by what max_num_seqs sequences of max_len tokens need."""
    if cache.num_blocks is not None:
        return cache.num_blocks, f"num_blocks={cache.num_blocks}"
    budget, sized = kv_cache_bytes(cache, device)
    by_memory = budget // (per_token * cache.block_size)
    needed = max_num_seqs * -(-max_len // cache.block_size)
    if by_memory >= needed:
        sized += f", capped at what {max_num_seqs} full contexts need"
    return max(1, min(by_memory, needed)), sized
