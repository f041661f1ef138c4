"""Configuration: one frozen dataclass per concern, the single source of every engine option.

Each field's docstring is its help text. `keel serve --help` and the other commands build their options
from these classes (keel.options), and keel.LLM / LLMEngine take any field by name (engine_config), so
a field added here exists everywhere at once. Validation names the field and the bad value.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from keel.errors import InvalidRequestError
from keel.quant.config import INT4_GROUP_SIZES, LOAD_METHODS


def _check(cond: bool, name: str, value, rule: str) -> None:
    if not cond:
        raise InvalidRequestError(f"{name}={value!r} is invalid: {rule}")


def _one_of(name: str, value, choices) -> None:
    _check(value in choices, name, value, "use one of " + ", ".join(map(str, choices)))


@dataclass(frozen=True)
class LoadConfig:
    """Model and weights."""
    model: str | None = field(default=None, metadata={"flags": ("--model", "-m")})
    """Model folder, GGUF file or hub id (default: the built-in SmolLM2-135M-Instruct)."""
    dtype: str | None = None
    """auto (float32 on CPUs, bfloat16 on GPUs that have it), float32, bfloat16 or float16."""
    device: str | None = None
    """cpu or cuda (default: cuda when available)."""
    quantization: Any = field(default=None, metadata={"flags": ("--quantize",), "choices": LOAD_METHODS})
    """Quantize the weights at load: int8 or int4 (a model written by `keel quantize` needs none); gguf keeps a
    GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are (the default for such files on a CPU where keel's kernels
    run); none dequantizes them. In Python also a keel.quant.QuantConfig."""
    quantize_group_size: int | None = field(default=None, metadata={"choices": INT4_GROUP_SIZES})
    """int4 only: input channels per scale and zero point (default 32)."""
    weight_dtype: str = field(default="auto", metadata={"choices": ("auto", "bfloat16", "model")})
    """Float32 models on CPU: 'auto' keeps the weights a checkpoint stores in bfloat16 in bfloat16 (exact, half
    the memory); 'bfloat16' rounds every dense weight to bfloat16; 'model' keeps every weight in the model's
    dtype."""

    def __post_init__(self) -> None:
        _one_of("weight_dtype", self.weight_dtype, ("auto", "bfloat16", "model"))


@dataclass(frozen=True)
class ComputeConfig:
    """Kernels."""
    kernels: str = field(default="auto", metadata={"choices": ("auto", "keel", "torch")})
    """Which code computes the layers: keel's CPU kernels where they build and pass their probe, else
    PyTorch's (auto); keel's or an error; PyTorch's only."""
    cpu_isa: str = field(default="auto", metadata={"choices": ("auto", "avx2", "avx512")})
    """Which build of keel's CPU kernels (auto: the best this CPU runs)."""
    batch_invariant: bool = True
    """A request's tokens and log-probabilities do not depend on what else is in its batch; off: faster long
    prefills, results that can vary with load."""
    # checked where the backend is chosen (keel.kernels.backend.choose), which also reads $KEEL_KERNELS


@dataclass(frozen=True)
class CacheConfig:
    """KV cache."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    num_blocks: int | None = None
    """Blocks in the KV cache (default: sized from kv_cache_memory_gb)."""
    kv_cache_memory_gb: float | None = field(default=None, metadata={
        "flags": ("--kv-cache-memory-gb", "--kv-cache-memory"), "metavar": "GB"})
    """Memory for the KV cache, in GiB, when num_blocks is not given (default: a tenth of the available RAM
    within 0.25-4 GiB on a CPU, gpu_memory_utilization on a GPU; capped by what max_num_seqs full contexts
    need)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical prompt prefixes."""
    gpu_memory_utilization: float = 0.9
    """On a GPU without kv_cache_memory_gb: the share of its memory keel may fill, weights included."""

    def __post_init__(self) -> None:
        _check(self.block_size > 0, "block_size", self.block_size, "must be > 0")
        _check(self.num_blocks is None or self.num_blocks > 0, "num_blocks", self.num_blocks, "must be > 0")
        _check(self.kv_cache_memory_gb is None or self.kv_cache_memory_gb > 0, "kv_cache_memory_gb",
               self.kv_cache_memory_gb, "must be > 0")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization,
               "must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching."""
    max_num_seqs: int = 64
    """Most sequences running in one batch."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step; longer prompts are prefilled in chunks."""
    max_model_len: int | None = None
    """Longest prompt plus output, in tokens (default: the model's own limit, and what the KV cache holds)."""

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "max_num_seqs", self.max_num_seqs, "must be > 0")
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", self.max_num_batched_tokens, "must be > 0")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len", self.max_model_len,
               "must be > 0")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters."""
    enable_lora: bool = False
    """Serve LoRA adapters (the request's `model` field names one)."""
    max_loras: int = 8
    """Adapters resident next to the model weights at once: one step mixes at most this many."""
    max_lora_rank: int = 16
    """Largest adapter rank accepted; each resident slot is sized for it."""
    max_cpu_loras: int | None = None
    """Loaded adapters kept in host memory (LRU), the rest are read from disk when needed (default: max_loras)."""
    check_base_model: bool = True
    """Refuse an adapter whose adapter_config.json names a clearly different base model."""
    lora_dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16", "float16")})
    """How adapter weights are stored: auto is the model's dtype (under a float32 model every adapter keeps
    every bit, whatever it was saved in); bfloat16 under a float32 model where keel's CPU kernel runs halves
    the bytes each step streams, exact for adapters saved in bfloat16 and rounding the others (opt-in)."""

    def __post_init__(self) -> None:
        _check(self.max_loras > 0, "max_loras", self.max_loras, "must be > 0")
        _check(self.max_lora_rank > 0, "max_lora_rank", self.max_lora_rank, "must be > 0")
        _check(self.max_cpu_loras is None or self.max_cpu_loras > 0, "max_cpu_loras", self.max_cpu_loras,
               "must be > 0")
        _one_of("lora_dtype", self.lora_dtype, ("auto", "float32", "bfloat16", "float16"))

    @property
    def cpu_loras(self) -> int:
        """max_cpu_loras, resolved."""
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from, one dataclass per concern."""
    load: LoadConfig = LoadConfig()
    compute: ComputeConfig = ComputeConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lora: LoRAConfig = LoRAConfig()


GROUPS: dict[str, type] = {"load": LoadConfig, "compute": ComputeConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
          "lora": LoRAConfig}


def engine_config(config: EngineConfig | None = None, **options) -> EngineConfig:
    """An EngineConfig from `config` (default: all defaults) with options changed by name: any field of any
    group (dtype=..., max_num_seqs=..., enable_lora=...), or a whole group (cache=CacheConfig(...))."""
    config = config or EngineConfig()
    owner = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
    groups: dict[str, dict] = {}
    for name, value in options.items():
        if name in GROUPS:
            if not isinstance(value, GROUPS[name]):
                raise TypeError(f"{name}= takes a keel.config.{GROUPS[name].__name__}, not {type(value).__name__}")
            config = dataclasses.replace(config, **{name: value})
        elif name in owner:
            groups.setdefault(owner[name], {})[name] = value
        else:
            near = difflib.get_close_matches(name, [*owner, *GROUPS], n=1)
            raise TypeError(f"unknown engine option {name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    changed = {}
    for g, kw in groups.items():
        current = getattr(config, g)
        changed[g] = GROUPS[g](**{**{f.name: getattr(current, f.name) for f in dataclasses.fields(current)}, **kw})
    return dataclasses.replace(config, **changed)
