"""What one engine request's outputs pass through on their way to the route: a time limit, the model's
output policy, and metering for the request's API key."""

from __future__ import annotations

import time
from typing import AsyncIterator

from keel.engine.async_engine import AsyncEngine
from keel.gateway import guardrails
from keel.gateway.keys import RequestUsage
from keel.outputs import RequestOutput


async def guarded(source: AsyncIterator[RequestOutput], policy, flagged) -> AsyncIterator[RequestOutput]:
    """`source` with the policy's output rules applied to each choice's text as it streams (see
    keel.gateway.guardrails.OutputFilter): held back until checked, redacted, or ended by a block. Token
    ids stay as generated; logprobs are dropped, since their tokens would show what was redacted."""
    filters: dict[int, guardrails.OutputFilter] = {}
    texts: dict[int, str] = {}
    ended: set[int] = set()
    try:
        async for out in source:
            for o in out.outputs:
                if o.index not in filters:
                    filters[o.index] = guardrails.OutputFilter(policy.output, [], policy.hold_chars)
                    texts[o.index] = ""
                f = filters[o.index]
                emitted = ""
                if o.index not in ended:
                    try:
                        emitted = f.feed(o.text[f.total:])
                        if o.finished:
                            emitted += f.finish()
                            ended.add(o.index)
                    except guardrails.PolicyViolation as e:
                        flagged(policy, [e.rule], "answer", "block")
                        raise
                    if f.flagged:
                        flagged(policy, f.flagged, "answer", "flag")
                        f.flagged.clear()
                texts[o.index] += emitted
                o.delta_text, o.text, o.logprobs = emitted, texts[o.index], None
            yield out
    finally:
        await source.aclose()


async def counted(source: AsyncIterator[RequestOutput], usage: RequestUsage,
                   prompt_tokens: int) -> AsyncIterator[RequestOutput]:
    """`source`, its tokens counted in `usage` when it ends (an error counts as one)."""
    usage.open += 1
    completion, error = 0, True
    try:
        async for out in source:
            completion = sum(len(o.token_ids) for o in out.outputs)
            if out.finished:
                error = out.error is not None
            yield out
    finally:
        usage.finish_one(prompt_tokens, completion, error)
        await source.aclose()


async def time_limited(source: AsyncIterator[RequestOutput], client: AsyncEngine, request_id: str,
                        deadline: float) -> AsyncIterator[RequestOutput]:
    """`source`, ended at `deadline` (time.monotonic) as if max_tokens had been reached."""
    import asyncio
    handle = asyncio.get_running_loop().call_at(
        asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic()), client.expire, request_id)
    try:
        async for out in source:
            yield out
    finally:
        handle.cancel()
        await source.aclose()
