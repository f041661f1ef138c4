"""A request as the scheduler sees it: token ids, progress and KV blocks. Torch-free."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from keel.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16
    """Effective limit: params.max_tokens capped by the context left after the prompt."""
    adapter_id: int | None = None
    """Which adapter computes this request's KV (None: the base model); part of the prefix-cache key."""
    wait_for: str | None = None
    """A sibling (same prompt, n > 1) whose prompt must be computed first so its blocks are reused."""
    guide: Any = None
    """keel.engine.guided.Guide constraining this sequence's tokens (structured output), or None."""
    trigger_scan: int = -1
    """params.grammar_trigger set and not met yet: output characters already searched for it (else -1)."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose keys and values are in the KV cache."""
    block_ids: list[int] = field(default_factory=list)
    """Block table: the KV blocks holding this request's tokens, in order."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache hash of each full block of all_token_ids, chained from the first."""
    num_cached_blocks: int = 0
    """Leading blocks already registered in the prefix cache."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was first scheduled."""
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    """"stop" (end-of-sequence, stop token or stop string), "length", or "abort"."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_id(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
