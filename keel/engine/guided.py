"""Grammar-constrained decoding: JSON Schema and JSON-object outputs that always parse.

A request that asks for structured output gets a `Guide`: a grammar matcher that, before each sampled
token, fills a bitmask of the tokens allowed next (the engine hands it to the runner with the step,
and the sampler sets the others to -inf) and, after each token, advances. The request ends as soon as the grammar is complete; the model's end-of-sequence
token is allowed only then.

Library choice: llguidance (bench/grammar_libs.py measured it against xgrammar and outlines-core;
bench/results/grammar_libs.md). Every library's per-token mask is cheap next to a decode step; what
differs is compilation, which runs on the engine thread and stalls every running request: llguidance
compiles lazily, the others ahead of time. llguidance also reads the `tokenizers` JSON we already hold
(no transformers at runtime), needs no torch of its own, and names the schema features it cannot
enforce (`not`, `uniqueItems`, unknown formats, look-around in patterns), which we turn into 400s
instead of silently unconstrained output.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from keel.errors import InvalidRequestError

# Compact JSON with the separators json.dumps writes: close to what models saw in training, and no
# free whitespace, which a sampling model can otherwise repeat until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


class StructuredOutputError(InvalidRequestError):
    """A schema or grammar that cannot be enforced; the message says why."""


def grammar_for(json_schema: Any = None, json_object: bool = False, lark: str | None = None) -> str | None:
    """The llguidance grammar text for one request's constraint, or None when it has none."""
    import llguidance as llg
    if lark is not None:
        return llg.LLMatcher.grammar_from_lark(lark)
    if json_schema is None and not json_object:
        return None
    schema = ANY_OBJECT if json_schema is None else json_schema
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    try:
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise StructuredOutputError(f"the JSON schema cannot be used: {e}") from None


class GrammarBackend:
    """Compiles grammars for one tokenizer and hands out per-request matchers. Thread-safe: the
    server compiles (to answer a bad schema with a 400) before the engine thread adds the request."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 128) -> None:
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self._lock = threading.Lock()
        self._lltok = None
        self._cache: OrderedDict[str, Any] = OrderedDict()  # grammar text -> compiled LLMatcher (never advanced)

    def _ll_tokenizer(self):
        if self._lltok is None:  # built on first use (it scans the vocabulary): engines without grammars never pay
            import llguidance as llg
            eos = list(self.tokenizer.eos_token_ids)
            try:
                self._lltok = llg.LLTokenizer(self.tokenizer._tok.to_str(), n_vocab=self.vocab_size, eos_token=eos)
            except ValueError:
                # llguidance reads byte-level BPE and SentencePiece-style tokenizer.json files; for any
                # other kind (e.g. WordLevel) give it each token's text as its bytes.
                self._lltok = llg.LLTokenizer(llg.TokenizerWrapper(_TokenTexts(self.tokenizer)),
                                              n_vocab=self.vocab_size, eos_token=eos)
        return self._lltok

    def compile_text(self, grammar: str) -> None:
        """Check (and cache) a grammar without keeping a matcher."""
        self.compile(grammar)

    def compile(self, grammar: str):
        """A fresh matcher for `grammar` (cached by its text); StructuredOutputError if it is invalid
        or uses something the library cannot enforce."""
        import llguidance as llg
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
                return template.deep_copy()
            lltok = self._ll_tokenizer()
            failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
            if failed or messages:  # a warning means part of the schema would not be enforced
                raise StructuredOutputError("the schema cannot be enforced: " + "; ".join(messages))
            template = llg.LLMatcher(lltok, grammar, log_level=0)
            if template.is_error():
                raise StructuredOutputError(f"the schema cannot be enforced: {template.get_error()}")
            self._cache[grammar] = template
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return template.deep_copy()

    def guide_for(self, params) -> Guide | None:
        """The Guide for one sequence under these SamplingParams, or None when they constrain nothing."""
        grammar = grammar_for(params.json_schema, params.json_object, params.grammar)
        return None if grammar is None else Guide(self.compile(grammar))

    def guide_after(self, params, text: str) -> Guide | None:
        """For params with grammar_trigger, once the output shows it: the Guide with `text` (what the
        output already holds past the trigger) consumed; None when that text already breaks the grammar."""
        guide = self.guide_for(params)
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        return guide if all(guide.accept(t) for t in ids) else None


class _TokenTexts:
    """The interface llguidance.TokenizerWrapper reads, from our Tokenizer."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = list(tokenizer.all_special_ids)
        self.tokens = [tokenizer.decode([i], skip_special_tokens=False).encode() for i in range(tokenizer.vocab_size)]

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)


class Guide:
    """One sequence's position in its grammar."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def fill(self, row: torch.Tensor) -> None:
        # row: [ceil(vocab / 32)] int32, contiguous, on the CPU; bit t set = token t allowed
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, token: int) -> bool:
        return self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (nor has a matcher error)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


_BITS = torch.arange(32, dtype=torch.int32)


def fill_bitmask(guide: Guide, vocab_size: int) -> torch.Tensor:
    """The tokens `guide` allows next: [ceil(vocab / 32)] int32 on the CPU, bit t set = token t allowed."""
    row = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
    guide.fill(row)
    return row


def apply_bitmasks(logits: torch.Tensor, rows: list[int], bitmasks: list[torch.Tensor]) -> None:
    """Set the logits of tokens each bitmask forbids to -inf, in place. logits: [N, V]; rows: which
    rows have a bitmask (from fill_bitmask)."""
    V = logits.shape[1]
    bitmask = torch.stack(bitmasks)  # [n, words]
    words = bitmask.shape[1]
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).bool().view(len(rows), words * 32)[:, :V]
    idx = torch.tensor(rows, device=logits.device)
    sub = logits[idx].masked_fill_(~allowed.to(logits.device), float("-inf"))
    dead = torch.isinf(sub).all(dim=1)
    if bool(dead.any()):
        # Penalties or min_tokens removed every token the grammar allows (e.g. min_tokens bans the
        # end-of-sequence token that is all a finished grammar allows): the grammar wins.
        sub[dead] = torch.where(allowed[dead].to(logits.device), 0.0, float("-inf"))
    logits[idx] = sub
