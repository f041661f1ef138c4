"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from keel.engine.guided import StructuredOutputError
from keel.outputs import CompletionOutput, Logprob
from keel.server.common import get_state, key_of, now, read_body
from keel.server.body import documented
from keel.server.errors import context_length_exceeded, from_exception
from keel.tokenizer import PromptTooLongError
from keel.server.protocol import ChatCompletionRequest, RequestError
from keel.server.streaming import STREAM_HEADERS, Fanin, safe_logprob, sse_stream, start, unless_disconnected
from keel.server.tools import (OPEN, ToolCallStream, call_grammar, call_or_answer_grammar, parse_tool_calls,
                               prepare_messages, supports_tools)

router = APIRouter()


def render_prompt(tokenizer, body: ChatCompletionRequest, max_len: int | None = None) -> list[int]:
    tools = body.tool_dicts if body.tool_mode != "none" else None
    messages, tools = prepare_messages([m.for_template() for m in body.messages], tools, supports_tools(tokenizer))
    return tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools, max_len=max_len)


def tool_params(client, body: ChatCompletionRequest, params) -> set[str]:
    """Check every tool's parameters schema (a bad one is a 400 whatever tool_choice says) and, when a
    call is forced, constrain params to it. Returns the names of the functions the output may call."""
    if not body.tools:
        return set()
    tools = body.tool_dicts
    try:
        client.check_grammar(call_grammar(tools, None, False))
    except StructuredOutputError as e:
        raise RequestError(f"Invalid parameters schema in tools: {e}", "tools", "invalid_function_parameters") from None
    mode = body.tool_mode
    parallel = body.parallel_tool_calls is not False
    if mode in ("required", "named"):
        name = body.tool_choice.function.name if mode == "named" else None
        params.grammar = call_grammar(tools, name, parallel)
    elif mode == "auto" and not params.structured:
        # free text, but a call the model starts is completed validly (arguments match the schema)
        params.grammar, params.grammar_trigger = call_grammar(tools, None, parallel, after_open=True), OPEN
    elif mode == "auto":
        # with response_format: calls, or the answer in that format (a bad format is blamed on it below)
        answer = {"type": "object"} if params.json_object else params.json_schema
        params.grammar = call_or_answer_grammar(tools, parallel, answer)
        params.json_schema, params.json_object = None, False
    return set() if mode == "none" else {t["function"]["name"] for t in tools}


@router.post("/chat/completions", openapi_extra=documented(ChatCompletionRequest))
async def create_chat_completion(request: Request):
    arrival = time.monotonic()
    body = await read_body(request, ChatCompletionRequest)
    state = get_state(request)
    adapter = state.check_model(body.model, key_of(request))
    # templating, tokenizing (seconds for a 5 MB message) and compiling a schema: off the event loop,
    # which serves every other client
    prompt_ids, params, names = await run_in_threadpool(_prepare, state, body)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    fanin = await start(request, [state.generate(request_id, prompt_ids, params, arrival, adapter,
                                                  state.usage_for(request, body.model, arrival))])
    head = {"id": request_id, "created": now(), "model": body.model,
            "system_fingerprint": state.fingerprint_for(adapter, key_of(request))}
    if body.stream:
        chunks = _chunks(fanin, head, params.n, body.include_usage, bool(body.logprobs),
                         params.include_stop_str_in_output, names)
        return StreamingResponse(sse_stream(chunks, lambda e: from_exception(e).body()),
                                 media_type="text/event-stream", headers=STREAM_HEADERS)
    final = await unless_disconnected(request, _last(fanin))
    include_stop = params.include_stop_str_in_output
    choices = []
    for o in final.outputs:
        message = {"role": "assistant", "content": o.text, "refusal": None}
        content, calls = parse_tool_calls(o.text, names, cut=o.finish_reason == "length") if names else (o.text, [])
        if calls:
            message.update(content=content, tool_calls=calls)
        choices.append({"index": o.index, "message": message,
                        "logprobs": _logprobs(visible_logprobs(o, include_stop)) if body.logprobs else None,
                        "finish_reason": tools_finish_reason(o, bool(calls))})
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage(final)})


def _prepare(state, body: ChatCompletionRequest):
    """The prompt's token ids, the sampling parameters and the names of the callable tools."""
    limit = state.client.info.max_model_len
    try:
        prompt_ids = render_prompt(state.client.info.tokenizer, body, max_len=limit)
    except PromptTooLongError as e:
        raise context_length_exceeded(limit, e.num_tokens, body.requested_max_tokens, "messages") from None
    max_tokens = state.max_tokens_for(len(prompt_ids), body.requested_max_tokens, "messages")
    params = body.sampling_params(max_tokens, body.num_logprobs)
    names = tool_params(state.client, body, params)
    check_structured(state.client, params, "response_format")
    return prompt_ids, params, names


def check_structured(client, params, param: str) -> None:
    """Compile the request's schema here (cached for the engine thread) so a bad one is a 400 naming
    `param`, before the request is queued."""
    if params.structured:
        try:
            client.check_structured(params)
        except StructuredOutputError as e:
            raise RequestError(f"Invalid schema in {param}: {e}", param, "invalid_json_schema") from None


async def _last(fanin: Fanin):
    final = None
    try:
        async for _, out in fanin:
            final = out
    finally:
        await fanin.aclose()
    return final


async def _chunks(fanin: Fanin, head: dict, n: int, include_usage: bool, want_logprobs: bool,
                  include_stop: bool, tool_names: set[str]) -> AsyncIterator[dict]:
    head = {**head, "object": "chat.completion.chunk"}
    if include_usage:
        head["usage"] = None

    def chunk(index: int, delta: dict, logprobs=None, reason=None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    try:
        for i in range(n):  # the role comes first, alone, as OpenAI sends it
            yield chunk(i, {"role": "assistant", "content": ""})
        sent = [0] * n  # logprobs already sent, per choice
        done = [False] * n
        tools = [ToolCallStream(tool_names) for _ in range(n)] if tool_names else None
        last = None
        async for _, out in fanin:
            last = out
            for o in out.outputs:  # finished choices stay in every output; skip them
                i = o.index
                if done[i]:
                    continue
                lps = None
                if want_logprobs:
                    new = visible_logprobs(o, include_stop)[sent[i]:]
                    sent[i] += len(new)
                    lps = _logprobs(new) if new else None
                if tools is not None:
                    deltas = _tool_deltas(tools[i], o)
                    if lps and not deltas:
                        deltas = [{}]  # tokens held back (a call head not yet readable): their logprobs still go
                    for k, d in enumerate(deltas):
                        yield chunk(i, d, lps if k == 0 else None)
                    if o.finished:
                        yield chunk(i, {}, None, tools_finish_reason(o, bool(tools[i].num_calls)))
                        done[i] = True
                    continue
                if not (o.delta_text or o.finished or lps):
                    continue  # tokens held back by the detokenizer (a partial character or stop string)
                delta = {"content": o.delta_text} if o.delta_text or lps else {}
                yield chunk(i, delta, lps, finish_reason(o) if o.finished else None)
                done[i] = o.finished
        if include_usage and last is not None:
            yield {**head, "choices": [], "usage": usage(last)}
    finally:
        await fanin.aclose()


def _tool_deltas(stream: ToolCallStream, o: CompletionOutput) -> list[dict]:
    deltas = stream.feed(o.delta_text) if o.delta_text else []
    return deltas + stream.finish(cut=o.finish_reason == "length") if o.finished else deltas


def tools_finish_reason(o: CompletionOutput, called: bool) -> str:
    # a call cut off by max_tokens stays in the content, and the client must learn that it was cut
    return "tool_calls" if called and o.finish_reason != "length" else finish_reason(o)


def finish_reason(o: CompletionOutput) -> str:
    # "abort" only reaches a client that already left; the API has no such value
    return o.finish_reason if o.finish_reason in ("stop", "length") else "stop"


def visible_logprobs(o: CompletionOutput, include_stop: bool) -> list[Logprob]:
    """Logprobs of the tokens in the text: a stop or end-of-sequence token that ended the output is
    left out of the text by the engine (unless include_stop_str_in_output), so its logprob is too."""
    lps = o.logprobs or []
    hidden = (o.finish_reason == "stop" and isinstance(o.stop_reason, int) and not include_stop
              and o.token_ids and o.token_ids[-1] == o.stop_reason and len(lps) == len(o.token_ids))
    return lps[:-1] if hidden else lps


def _logprobs(lps: list[Logprob]) -> dict:
    def entry(token: str, lp: float) -> dict:
        # bytes of the decoded text: a token that is part of a multi-byte character decodes to U+FFFD
        return {"token": token, "logprob": safe_logprob(lp), "bytes": list(token.encode("utf-8"))}
    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]}
                        for lp in lps], "refusal": None}


def usage(out) -> dict:
    completion = sum(len(o.token_ids) for o in out.outputs)
    prompt = len(out.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}
