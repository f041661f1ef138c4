"""Sampling parameters of one request, with the names the OpenAI API and vLLM use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from keel.errors import InvalidRequestError


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions for the prompt; they share the prompt's KV blocks."""
    temperature: float = 1.0
    """0 means greedy (so does anything below 1e-5, as in vLLM: smaller ones overflow float32)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens seen in the prompt or output."""
    presence_penalty: float = 0.0
    """Subtract from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtract this times the count of each generated token, in [-2, 2]."""
    logit_bias: dict[int, float] | None = None
    """Token id -> bias added to its logit, in [-100, 100]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: list[str] | str | None = None
    """Strings that end generation; the text is cut before them."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (besides the model's end-of-sequence ids)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens are suppressed until this many tokens are generated."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens."""
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many most likely alternatives."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    json_schema: dict | bool | str | None = None
    """Constrain the output to JSON that validates against this JSON Schema (a dict or its JSON text)."""
    json_object: bool = False
    """Constrain the output to one JSON object (any keys and values)."""
    grammar: str | None = None
    """Constrain the output to this Lark grammar (llguidance's dialect; `%json {...}` embeds a schema)."""
    grammar_trigger: str | None = None
    """With `grammar`: generate freely until the output contains this text, then constrain what follows
    it to the grammar (tool_choice "auto": a call the model starts is completed validly)."""
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def _bad(self, name: str, value, rule: str) -> InvalidRequestError:
        return InvalidRequestError(f"{name}={value!r} is invalid: {rule}")

    def validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self._bad(name, value, "must be a finite number")
        if self.seed is not None and (not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**63):
            raise self._bad("seed", self.seed, "must be an integer in [-2**63, 2**63)")
        if not isinstance(self.n, int) or self.n < 1:
            raise self._bad("n", self.n, "must be an integer >= 1")
        if self.temperature < 0:
            raise self._bad("temperature", self.temperature, "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise self._bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise self._bad("top_k", self.top_k, "must be 0 or -1 (all tokens) or a positive integer up to the "
                                                 "vocabulary size")
        if not 0 <= self.min_p <= 1:
            raise self._bad("min_p", self.min_p, "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise self._bad("repetition_penalty", self.repetition_penalty, "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise self._bad(name, getattr(self, name), "must be in [-2, 2]")
        for tok, bias in (self.logit_bias or {}).items():
            if not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise self._bad("logit_bias", {tok: bias}, "biases must be in [-100, 100]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise self._bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise self._bad("min_tokens", self.min_tokens, "must be >= 0 and <= max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise self._bad("logprobs", self.logprobs, "must be in [0, 20]")
        if sum((self.json_schema is not None, bool(self.json_object), self.grammar is not None)) > 1:
            raise self._bad("json_schema", self.json_schema, "give only one of json_schema, json_object and grammar")
        if self.grammar_trigger is not None and (self.grammar is None or not isinstance(self.grammar_trigger, str)
                                                 or not self.grammar_trigger):
            raise self._bad("grammar_trigger", self.grammar_trigger, "needs `grammar`, and must be a non-empty string")
        if any(not isinstance(s, str) or not s for s in self.stop_list):
            raise self._bad("stop", self.stop, "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def structured(self) -> bool:
        """The output is constrained by a schema or grammar."""
        return self.json_schema is not None or bool(self.json_object) or self.grammar is not None
