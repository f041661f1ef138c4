"""POST /v1/completions (the legacy text-completion API).

Several prompts in one request run as separate engine requests at once; choice i*n + j is the j-th
completion of prompt i, as in OpenAI's API.
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from keel.outputs import CompletionOutput, RequestOutput
from keel.server.common import get_state, key_of, now, read_body
from keel.server.chat import finish_reason, visible_logprobs
from keel.server.body import documented
from keel.server.errors import context_length_exceeded, from_exception
from keel.tokenizer import PromptTooLongError
from keel.server.protocol import CompletionRequest
from keel.server.streaming import STREAM_HEADERS, Fanin, safe_logprob, sse_stream, start, unless_disconnected

router = APIRouter()


class _Choice:
    """One choice's text and completions-style logprobs, built up output by output.

    text_offset needs the character position of each token in the text. Decoding tokens one by one
    would not give it (spaces, multi-byte characters), so each token gets the position where the text
    of the step that produced it starts: exact when every step yields one token, as it does."""

    def __init__(self, echo: str, include_stop: bool) -> None:
        self.echo = echo
        self.include_stop = include_stop
        self.length = len(echo)
        self.sent = 0
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def update(self, o: CompletionOutput, want_logprobs: bool) -> dict | None:
        """Feed one output; returns the logprobs of its new tokens (or None when not asked for)."""
        start = len(self.tokens)
        if want_logprobs:
            new = visible_logprobs(o, self.include_stop)[self.sent:]
            self.sent += len(new)
            for lp in new:
                self.tokens.append(lp.token)
                self.token_logprobs.append(safe_logprob(lp.logprob))
                top = {t: safe_logprob(v) for _, t, v in lp.top}
                top.setdefault(lp.token, safe_logprob(lp.logprob))
                self.top_logprobs.append(top)
                self.text_offset.append(self.length)
        self.length += len(o.delta_text)
        return self.logprobs(start) if want_logprobs else None

    def logprobs(self, start: int = 0) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


@router.post("/completions", openapi_extra=documented(CompletionRequest))
async def create_completion(request: Request):
    arrival = time.monotonic()
    body = await read_body(request, CompletionRequest)
    state = get_state(request)
    adapter = state.check_model(body.model, key_of(request))
    tok = state.client.info.tokenizer
    prompts = body.prompts
    ids, params = await run_in_threadpool(_prepare, state, body, prompts)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    n = body.n or 1
    echoes = [(p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False)) if body.echo else ""
              for p in prompts]
    include_stop = bool(body.include_stop_str_in_output)
    choices = [_Choice(echoes[k // n], include_stop) for k in range(len(prompts) * n)]
    metered = state.usage_for(request, body.model, arrival)
    fanin = await start(request, [state.generate(f"{request_id}-{k}", p, params[k], arrival, adapter, metered)
                                  for k, p in enumerate(ids)])
    head = {"id": request_id, "object": "text_completion", "created": now(), "model": body.model,
            "system_fingerprint": state.fingerprint_for(adapter, key_of(request))}
    want_lp = body.logprobs is not None
    if body.stream:
        chunks = _chunks(fanin, head, choices, n, len(prompts), body.include_usage, want_lp)
        return StreamingResponse(sse_stream(chunks, lambda e: from_exception(e).body()),
                                 media_type="text/event-stream", headers=STREAM_HEADERS)
    finals = await unless_disconnected(request, _collect(fanin, choices, n, want_lp))
    out = []
    for k, c in enumerate(choices):
        o = finals[k // n].outputs[k % n]
        out.append({"index": k, "text": c.echo + o.text, "logprobs": c.logprobs() if want_lp else None,
                    "finish_reason": finish_reason(o)})
    return JSONResponse({**head, "choices": out, "usage": usage(finals)})


def _prepare(state, body: CompletionRequest, prompts: list) -> tuple[list[list[int]], list]:
    """Token ids and sampling parameters per prompt. Tokenized here (as the engine would) so that the
    context check and usage see the same ids; on a worker thread, as a long prompt takes seconds."""
    tok, limit = state.client.info.tokenizer, state.client.info.max_model_len
    try:
        ids = [tok.encode(p, max_len=limit) if isinstance(p, str) else list(p) for p in prompts]
    except PromptTooLongError as e:
        raise context_length_exceeded(limit, e.num_tokens, body.max_tokens, "prompt") from None
    params = [body.sampling_params(state.max_tokens_for(len(p), body.max_tokens, "prompt"), body.logprobs)
              for p in ids]
    return ids, params


async def _collect(fanin: Fanin, choices: list[_Choice], n: int, want_lp: bool) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    try:
        async for src, out in fanin:
            for o in out.outputs:
                choices[src * n + o.index].update(o, want_lp)
            finals[src] = out
    finally:
        await fanin.aclose()
    return [finals[k] for k in sorted(finals)]


async def _chunks(fanin: Fanin, head: dict, choices: list[_Choice], n: int, num_prompts: int,
                  include_usage: bool, want_lp: bool) -> AsyncIterator[dict]:
    if include_usage:
        head = {**head, "usage": None}
    done = [False] * len(choices)
    echoed = [False] * len(choices)
    finals: dict[int, RequestOutput] = {}
    try:
        async for src, out in fanin:
            finals[src] = out
            for o in out.outputs:
                k = src * n + o.index
                if done[k]:
                    continue
                lps = choices[k].update(o, want_lp)
                text = o.delta_text
                if not echoed[k]:
                    text, echoed[k] = choices[k].echo + text, True
                if not (text or o.finished or (lps and lps["tokens"])):
                    continue
                yield {**head, "choices": [{"index": k, "text": text, "logprobs": lps,
                                            "finish_reason": finish_reason(o) if o.finished else None}]}
                done[k] = o.finished
        if include_usage and len(finals) == num_prompts:
            yield {**head, "choices": [], "usage": usage([finals[i] for i in sorted(finals)])}
    finally:
        await fanin.aclose()


def usage(finals: list[RequestOutput]) -> dict:
    prompt = sum(len(f.prompt_token_ids) for f in finals)  # each prompt once, however many choices
    completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.num_cached_tokens for f in finals)}}
