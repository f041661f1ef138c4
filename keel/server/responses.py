"""POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}, and
GET /v1/responses/{id}/input_items.

A request runs through the chat path (keel.server.responses_items translates it). `store` (true by
default, as OpenAI's) keeps the response, its input items and the conversation in the state database
(keel.store), so `previous_response_id` continues it, also after a restart. Streaming sends the typed
events the SDKs parse: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta / .done, response.content_part.done,
response.function_call_arguments.delta / .done, response.output_item.done, then response.completed
(or response.incomplete when max_output_tokens cut it).
"""

from __future__ import annotations

import json
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from keel.server.body import documented
from keel.server.chat import _last, _prepare, visible_logprobs
from keel.server.chat import _logprobs as chat_logprobs
from keel.server.errors import APIError, from_exception, shown
from keel.server.responses_items import (ResponsesRequest, call_item, chat_request, history_after, message_item,
                                         new_id, output_items)
from keel.server.streaming import STREAM_HEADERS, Fanin, start, unless_disconnected
from keel.server.tools import ToolCallStream, parse_tool_calls
from keel.server.common import get_state, key_of, read_body

router = APIRouter()


def _store(request: Request):
    return get_state(request).responses


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"No response with id '{shown(response_id)}' is stored here.", code="response_not_found",
                    param="response_id")


def _head(body: ResponsesRequest, response_id: str, created: int) -> dict:
    """The fields of a response object that come from the request."""
    return {"id": response_id, "object": "response", "created_at": created, "status": "in_progress",
            "completed_at": None, "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": body.model, "output": [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": None, "store": body.store is not False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": body.text or {"format": {"type": "text"}}, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "metadata": body.metadata if isinstance(body.metadata, dict) else {}}


def _finish(resp: dict, output: list[dict], final, fingerprint: str) -> dict:
    o = final.outputs[0]
    cut = o.finish_reason == "length"
    prompt, completion = len(final.prompt_token_ids), len(o.token_ids)
    resp.update(status="incomplete" if cut else "completed", completed_at=int(time.time()), output=output,
                incomplete_details={"reason": "max_output_tokens"} if cut else None,
                # cache_write_tokens: the prompt tokens computed here, which the prefix cache then holds
                usage={"input_tokens": prompt, "input_tokens_details": {
                           "cached_tokens": final.num_cached_tokens,
                           "cache_write_tokens": prompt - final.num_cached_tokens},
                       "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                       "total_tokens": prompt + completion})
    resp["system_fingerprint"] = fingerprint  # keel's addition, as on chat
    return resp


def _logprobs(o, include_stop: bool, start: int = 0) -> list[dict]:
    """The output's logprobs from `start` on, as the chat endpoint writes them (the same entries)."""
    return chat_logprobs(visible_logprobs(o, include_stop)[start:])["content"]


@router.post("/responses", openapi_extra=documented(ResponsesRequest))
async def create_response(request: Request):
    arrival = time.monotonic()
    body = await read_body(request, ResponsesRequest)
    state = get_state(request)
    adapter = state.check_model(body.model, key_of(request))
    store = _store(request)
    history = []
    if body.previous_response_id is not None:
        history = await run_in_threadpool(store.conversation, body.previous_response_id)
        if history is None:
            raise APIError(404, f"previous_response_id '{shown(body.previous_response_id)}' is not stored here "
                                f"(it was never stored, or was deleted).", code="previous_response_not_found",
                           param="previous_response_id")
    chat, input_items, new_messages = chat_request(body, history)
    prompt_ids, params, names = await run_in_threadpool(_prepare, state, chat)
    response_id = new_id("resp")
    fanin = await start(request, [state.generate(f"{response_id}-0", prompt_ids, params, arrival, adapter,
                                                  state.usage_for(request, body.model, arrival))])
    resp = _head(body, response_id, int(time.time()))
    fingerprint = state.fingerprint_for(adapter, key_of(request))
    conversation = history + new_messages

    def keep(final_resp: dict) -> None:
        if body.store is not False:
            store.put(final_resp, input_items, history_after(conversation, final_resp["output"]))

    if body.stream:
        events = _events(fanin, resp, names, bool(body.top_logprobs is not None), params.include_stop_str_in_output,
                         fingerprint, keep)
        return StreamingResponse(_sse(events), media_type="text/event-stream", headers=STREAM_HEADERS)
    final = await unless_disconnected(request, _last(fanin))
    o = final.outputs[0]
    content, calls = parse_tool_calls(o.text, names, cut=o.finish_reason == "length") if names else (o.text, [])
    output = output_items(content, calls, "incomplete" if o.finish_reason == "length" else "completed")
    if body.top_logprobs is not None and output and output[0]["type"] == "message":
        output[0]["content"][0]["logprobs"] = _logprobs(o, params.include_stop_str_in_output)
    resp = _finish(resp, output, final, fingerprint)
    await run_in_threadpool(keep, resp)
    return JSONResponse(resp)


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Typed server-sent events: `event: <type>` then the data line (no [DONE] in this API)."""
    seq = 0
    try:
        async for e in events:
            e["sequence_number"] = seq
            seq += 1
            yield f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False, separators=(',', ':'))}\n\n"
    except Exception as exc:
        err = from_exception(exc)
        e = {"type": "error", "code": err.code, "message": err.message, "param": err.param, "sequence_number": seq}
        yield f"event: error\ndata: {json.dumps(e, ensure_ascii=False)}\n\n"
    finally:
        await events.aclose()


async def _events(fanin: Fanin, resp: dict, names: set[str], want_lp: bool, include_stop: bool, fingerprint: str,
                  keep) -> AsyncIterator[dict]:
    yield {"type": "response.created", "response": dict(resp)}
    yield {"type": "response.in_progress", "response": dict(resp)}
    items: list[dict] = []  # output items so far, in order
    msg = None  # the open message item
    call = None  # the open function_call item
    calls = ToolCallStream(names) if names else None
    sent_lp = 0
    final = None

    def open_message():
        nonlocal msg
        msg = message_item(new_id("msg"), "", "in_progress")
        items.append(msg)
        part = dict(msg["content"][0])
        return [{"type": "response.output_item.added", "output_index": len(items) - 1,
                 "item": {**msg, "content": []}},
                {"type": "response.content_part.added", "item_id": msg["id"], "output_index": len(items) - 1,
                 "content_index": 0, "part": part}]

    def close_message():
        nonlocal msg
        if msg is None:
            return []
        i, part = items.index(msg), msg["content"][0]
        msg["status"] = "completed"
        out = [{"type": "response.output_text.done", "item_id": msg["id"], "output_index": i, "content_index": 0,
                "text": part["text"], "logprobs": part["logprobs"]},
               {"type": "response.content_part.done", "item_id": msg["id"], "output_index": i, "content_index": 0,
                "part": dict(part)},
               {"type": "response.output_item.done", "output_index": i, "item": json.loads(json.dumps(msg))}]
        msg = None
        return out

    def text(delta: str, lps: list) -> list[dict]:
        out = [] if msg is not None else open_message()
        part = msg["content"][0]
        part["text"] += delta
        part["logprobs"] += lps
        return out + [{"type": "response.output_text.delta", "item_id": msg["id"], "output_index": items.index(msg),
                       "content_index": 0, "delta": delta, "logprobs": lps}]

    def on_call(d: dict) -> list[dict]:
        nonlocal call
        out = []
        fields = d["tool_calls"][0]
        if "id" in fields:  # a new call: its header
            out += close_call() + close_message()
            call = call_item(new_id("fc"), fields["id"], fields["function"]["name"], "", "in_progress")
            items.append(call)
            out.append({"type": "response.output_item.added", "output_index": len(items) - 1, "item": dict(call)})
        delta = fields.get("function", {}).get("arguments", "")
        if delta and call is not None:
            call["arguments"] += delta
            out.append({"type": "response.function_call_arguments.delta", "item_id": call["id"],
                        "output_index": items.index(call), "delta": delta})
        return out

    def close_call() -> list[dict]:
        nonlocal call
        if call is None:
            return []
        i = items.index(call)
        call["status"] = "completed"
        out = [{"type": "response.function_call_arguments.done", "item_id": call["id"], "output_index": i,
                "name": call["name"], "arguments": call["arguments"]},
               {"type": "response.output_item.done", "output_index": i, "item": dict(call)}]
        call = None
        return out

    try:
        async for _, out in fanin:
            final = out
            o = out.outputs[0]
            lps = []
            if want_lp:
                lps = _logprobs(o, include_stop, sent_lp)
                sent_lp += len(lps)
            if calls is None:
                if o.delta_text or lps:
                    for e in text(o.delta_text, lps):
                        yield e
                continue
            deltas = calls.feed(o.delta_text) if o.delta_text else []
            if o.finished:
                deltas += calls.finish(cut=o.finish_reason == "length")
            for d in deltas:
                if "content" in d:
                    for e in close_call() + text(d["content"], []):
                        yield e
                else:
                    for e in on_call(d):
                        yield e
        for e in close_call() + close_message():
            yield e
    finally:
        await fanin.aclose()
    if final is None:
        return
    done = _finish(resp, items, final, fingerprint)
    await run_in_threadpool(keep, done)
    yield {"type": "response.incomplete" if done["status"] == "incomplete" else "response.completed", "response": done}


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    resp = await run_in_threadpool(_store(request).response, response_id)
    if resp is None:
        raise _not_found(response_id)
    return JSONResponse(resp)


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    if not await run_in_threadpool(_store(request).delete, response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, order: str = "desc", limit: int = 20,
                           after: str | None = None):
    items = await run_in_threadpool(_store(request).input_items, response_id)
    if items is None:
        raise _not_found(response_id)
    if order not in ("asc", "desc") or not 1 <= limit <= 100:
        raise APIError(400, "order must be asc or desc, and limit between 1 and 100", param="order")
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

