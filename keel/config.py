"""Configuration, one dataclass per concern. Each field's docstring is its help text."""

from __future__ import annotations

from dataclasses import dataclass

from keel.errors import InvalidRequestError


def _check(cond: bool, name: str, value, rule: str) -> None:
    if not cond:
        raise InvalidRequestError(f"{name}={value!r} is invalid: {rule}")


@dataclass
class CacheConfig:
    block_size: int = 16
    """Tokens per KV-cache block."""
    num_blocks: int | None = None
    """Blocks in the KV cache; None sizes the cache from kv_cache_memory_gb."""
    kv_cache_memory_gb: float | None = None
    """Memory given to the KV cache when num_blocks is None (capped by what max_num_seqs full contexts
    need); None: sized from what the machine has (see keel.engine.memory)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical prompt prefixes."""
    gpu_memory_utilization: float = 0.9
    """On a GPU with kv_cache_memory_gb None: the share of its memory keel may fill, weights included."""

    def __post_init__(self) -> None:
        _check(self.block_size > 0, "block_size", self.block_size, "must be > 0")
        _check(self.num_blocks is None or self.num_blocks > 0, "num_blocks", self.num_blocks, "must be > 0")
        _check(self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0, "kv_cache_memory_gb",
               self.kv_cache_memory_gb, "must be > 0")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization,
               "must be in (0, 1]")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step; longer prompts are prefilled in chunks."""
    max_model_len: int = 4096
    """Longest prompt plus output, in tokens (capped by the model's own limit)."""

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "max_num_seqs", self.max_num_seqs, "must be > 0")
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", self.max_num_batched_tokens, "must be > 0")
        _check(self.max_model_len > 0, "max_model_len", self.max_model_len, "must be > 0")


@dataclass
class LoRAConfig:
    max_loras: int = 8
    """Adapters resident next to the model weights at once: one step mixes at most this many."""
    max_lora_rank: int = 16
    """Largest adapter rank accepted; each resident slot is sized for it."""
    max_cpu_loras: int | None = None
    """Loaded adapters kept in host memory (LRU), the rest are read from disk when needed; None: max_loras."""
    check_base_model: bool = True
    """Refuse an adapter whose adapter_config.json names a clearly different base model."""
    lora_dtype: str = "auto"
    """How resident and host-memory adapter weights are stored: "auto" is the model's dtype (under a
    float32 model every adapter keeps every bit, whatever it was saved in); "bfloat16" under a float32
    model where keel's CPU kernel runs halves the bytes each step streams, exact for adapters saved in
    bfloat16 and rounding the others (opt-in); or "float32" / "float16"."""

    def __post_init__(self) -> None:
        _check(self.max_loras > 0, "max_loras", self.max_loras, "must be > 0")
        _check(self.max_lora_rank > 0, "max_lora_rank", self.max_lora_rank, "must be > 0")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        _check(self.max_cpu_loras > 0, "max_cpu_loras", self.max_cpu_loras, "must be > 0")
        _check(self.lora_dtype in ("auto", "float32", "bfloat16", "float16"), "lora_dtype", self.lora_dtype,
               "must be auto, float32, bfloat16 or float16")
