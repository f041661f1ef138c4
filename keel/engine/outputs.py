"""The contract between the scheduler and the model runner: plain data, nothing live.

The runner keeps its own state per request (token ids, block table, sampling parameters) and learns
of changes only through a `SchedulerOutput`: requests it has not seen (or lost on preemption) arrive
whole, the others as deltas. Both dataclasses pickle, so the runner could sit behind a queue, in
another thread or another process, without any change (tests/engine/test_runner_contract.py does so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keel.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner holds no state for: scheduled for the first time, or again after preemption."""
    request_id: str
    token_ids: tuple[int, ...]  # prompt, then the tokens generated so far (a resumed request keeps them)
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    adapter_id: int | None
    block_ids: tuple[int, ...]  # the whole block table
    num_computed_tokens: int  # tokens whose KV is in the cache already (prefix-cache hits)


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner already holds: only what changed since its last step."""
    request_id: str
    new_block_ids: tuple[int, ...]  # appended to the runner's block table
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # request id -> tokens computed this step, in batch order
    sampling_ids: set[str] = field(default_factory=set)  # requests whose step reaches their last token: they sample
    preempted_ids: list[str] = field(default_factory=list)  # lost their KV; the runner drops their state
    finished_ids: list[str] = field(default_factory=list)  # ended since the last step; the runner drops their state
    adapter_ids_in_use: set[int] = field(default_factory=set)  # adapters of all running requests: stay resident
    grammar_bitmask: dict[str, Any] = field(default_factory=dict)
    """Request id -> allowed-token bitmask (int32 tensor, bit t = token t) for a sampling request under
    a grammar; filled by the engine, which owns the grammar state (keel.engine.guided)."""

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def scheduled_ids(self) -> list[str]:
        return list(self.num_scheduled_tokens)


@dataclass
class TokenLogprobs:
    logprob: float  # log-probability of the sampled token
    top: list[tuple[int, float]]  # the most likely tokens and their log-probabilities, best first


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int]  # request id -> token sampled this step
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # only for requests that asked
    errors: dict[str, Exception] = field(default_factory=dict)  # request id -> why its sampling failed
