"""Before a request reaches the scheduler: its prompt tokenized and checked against the model, its
sampling parameters checked where their range depends on the model, its grammar compiled, and its
`n` choices fanned out into sequences of their own."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from keel.engine.request import Request
from keel.errors import InvalidRequestError
from keel.sampling_params import SamplingParams


@dataclass
class ProcessedRequest:
    prompt: str | None  # the text, when the prompt was given as text
    prompt_token_ids: list[int]
    children: list[Request]  # one sequence per choice; the first computes the shared prompt


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], structured,
                 max_model_len: int) -> None:
        """structured: keel.engine.guided.GrammarBackend."""
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self.structured, self.max_model_len = structured, max_model_len

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                adapter_id: int | None) -> ProcessedRequest:
        """InvalidRequestError (or StructuredOutputError) naming what is wrong; nothing is kept."""
        text, ids = self.tokenize(prompt)
        self.check_params(params)
        guide = self.structured.guide_for(params) if params.structured else None  # a bad schema raises here
        lazy = params.grammar_trigger is not None
        if lazy:
            guide = None  # the grammar is checked; it starts when the output shows the trigger
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        children = []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None:
                p = copy.copy(params)
                p.seed = params.seed + i  # each choice its own stream, still reproducible
            children.append(Request(
                f"{request_id}#{i}", ids, p, self.eos_token_ids, max_tokens, adapter_id,
                wait_for=f"{request_id}#0" if i else None,
                guide=(guide if i == 0 else self.structured.guide_for(p)) if guide else None,
                trigger_scan=0 if lazy else -1))
        return ProcessedRequest(text, ids, children)

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens, but this model's context is {self.max_model_len} tokens "
                f"(prompt plus at least one generated token)")
        return text, ids

    def check_params(self, params: SamplingParams) -> None:
        """The parameters whose valid range depends on the model: token ids and top_k."""
        vocab = self.vocab_size
        if params.top_k > vocab:
            raise InvalidRequestError(f"top_k={params.top_k} is invalid: this model has {vocab} tokens, so top_k "
                                      f"can be at most {vocab} (or 0 / -1 for all of them)", "top_k")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or {}))):
            for t in ids:
                try:
                    ok = 0 <= int(t) < vocab
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise InvalidRequestError(f"{name} has token id {t!r}, outside the vocabulary [0, {vocab})", name)
