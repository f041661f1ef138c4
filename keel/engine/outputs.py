"""The contract between the scheduler and the model runner: two small dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

from keel.engine.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    samples: bool = False  # this step reaches the last known token, so a new token is sampled

    def __post_init__(self) -> None:
        self.samples = self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # batch order: running requests first, then newly admitted ones
    preempted_ids: list[str] = field(default_factory=list)  # lost their KV this step; recomputed later
    finished_ids: list[str] = field(default_factory=list)  # ended since the last step; runner drops their state
    adapter_ids_in_use: set[int] = field(default_factory=set)  # adapters of all running requests: stay resident

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request.request_id: s.num_tokens for s in self.scheduled}

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass
class TokenLogprobs:
    logprob: float  # log-probability of the sampled token
    top: list[tuple[int, float]]  # the most likely tokens and their log-probabilities, best first


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int]  # request id -> token sampled this step
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # only for requests that asked
    errors: dict[str, Exception] = field(default_factory=dict)  # request id -> why its sampling failed
