"""Running engine requests for one HTTP request: fan-in of several generations, SSE framing, and
giving up (aborting, freeing KV blocks) as soon as the client goes away.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request

from keel.outputs import RequestOutput

T = TypeVar("T")
_END = object()
DISCONNECT_POLL_S = 0.25


class ClientDisconnected(Exception):
    pass


class Fanin:
    """Runs several engine generations at once (a completions request with many prompts) and yields
    `(source index, output)` in the order they arrive.

    Each source is an async generator from AsyncEngine.generate; closing it aborts its request. So
    every exit path (finished, error, client gone, task cancelled) closes every source."""

    def __init__(self, sources: list[AsyncIterator[RequestOutput]]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: deque = deque()
        self._live = len(sources)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(sources)]

    async def _pump(self, i: int, source) -> None:
        try:
            self._queue.put_nowait((i, await _first(source)))
            async for out in source:
                self._queue.put_nowait((i, out))
        except StopAsyncIteration:  # ended without any output
            pass
        except Exception as e:  # handed to the consumer, which raises it in the request's context
            self._queue.put_nowait((i, e))
        finally:
            await source.aclose()
            self._queue.put_nowait((i, _END))

    async def start(self) -> None:
        """Wait until every source produced its first output. Errors that come with the first output
        (invalid prompt, queue full) are raised here, before any HTTP response has started."""
        started: set[int] = set()
        while len(started) < len(self._tasks):
            i, item = await self._queue.get()
            if isinstance(item, BaseException):
                await self.aclose()
                raise item
            self._buffer.append((i, item))
            started.add(i)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while self._live:
            i, item = self._buffer.popleft() if self._buffer else await self._queue.get()
            if item is _END:
                self._live -= 1
                continue
            if isinstance(item, BaseException):
                await self.aclose()
                raise item
            return i, item
        raise StopAsyncIteration

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def start(request: Request, sources: list[AsyncIterator[RequestOutput]]) -> Fanin:
    """A Fanin over `sources` whose first outputs have arrived (so request errors are raised now, while
    an HTTP error status can still be sent); everything is aborted if that fails or the client leaves."""
    fanin = Fanin(sources)
    try:
        await unless_disconnected(request, fanin.start())
    except BaseException:
        await fanin.aclose()
        raise
    return fanin


async def _first(source):
    """The source's first output, never cancelled half-way.

    AsyncEngine.generate hands its request to the engine thread and then waits for the acceptance
    outside its try/finally: cancelling it there leaks the request, and the engine thread then fails
    on the cancelled future and stops for good. So on cancellation we let that first step finish
    (the request is then known to the engine) and re-raise; the caller's aclose() then aborts it."""
    first = asyncio.ensure_future(source.__anext__())
    try:
        return await asyncio.shield(first)
    except asyncio.CancelledError:
        await asyncio.wait({first})
        if not first.cancelled():
            first.exception()  # retrieved, so asyncio does not log it as unhandled
        raise


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (which aborts its engine requests) if the client disconnects first.

    Needed for non-streamed responses and for the wait before a stream's first chunk: nothing is being
    sent then, so the server would not otherwise notice the client leaving until generation ends."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


DONE = sse("[DONE]")
# no-cache for clients, X-Accel-Buffering for nginx, which would otherwise hold chunks back
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def sse_stream(chunks: AsyncIterator[dict], on_error: Callable[[BaseException], dict]) -> AsyncIterator[str]:
    """Frames chunks as server-sent events, ending with [DONE]. An error after the response started
    can no longer change the status code, so it goes out as an error event, which the OpenAI client
    raises as an APIError. A client disconnect cancels this generator; `chunks` is closed either way."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except Exception as e:
        yield sse(on_error(e))
    finally:
        await chunks.aclose()
    yield DONE


def safe_logprob(value: float) -> float:
    # JSON has no -inf; OpenAI documents -9999.0 for "very unlikely", which is what -inf means here.
    return value if value == value and value > -9999.0 else -9999.0
