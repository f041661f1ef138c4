"""What one client may cost the server: body size, how long it may take to send its request, how many
connections are open, how much one embeddings request may ask for.

Each limit is a `keel serve` flag. Past one, the client gets OpenAI's error shape (413 for a body that
is too large, 408 for one that is too slow) or, for a client that never finishes its headers, a closed
connection: there is no request yet to answer.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

from keel.config import _check
from keel.server.errors import APIError


@dataclass
class ServerLimits:
    max_request_bytes: int = 32 * 2**20
    """Largest request body accepted, in bytes; a larger one is a 413 before it is read."""
    max_upload_bytes: int = 512 * 2**20
    """Largest POST /v1/files body (a training file; OpenAI's own limit per file), in bytes."""
    body_timeout_s: float = 60.0
    """Seconds a client has to send its whole request body once its headers arrived (408 after)."""
    header_timeout_s: float = 10.0
    """Seconds a connection may hold an incomplete request head (headers) before it is closed."""
    max_connections: int | None = 1000
    """Connections (and requests in flight) served at once; past it uvicorn answers 503. None: no limit."""
    max_embedding_inputs: int = 2048
    """Most inputs in one POST /v1/embeddings request (OpenAI's own limit)."""
    max_json_depth: int = 64
    """Deepest nesting of arrays and objects accepted in a JSON body, tool arguments or adapter config."""

    def __post_init__(self) -> None:
        _check(self.max_request_bytes > 0, "max_request_bytes", self.max_request_bytes, "must be > 0")
        _check(self.max_upload_bytes > 0, "max_upload_bytes", self.max_upload_bytes, "must be > 0")
        _check(self.body_timeout_s > 0, "body_timeout_s", self.body_timeout_s, "must be > 0")
        _check(self.header_timeout_s > 0, "header_timeout_s", self.header_timeout_s, "must be > 0")
        _check(self.max_connections is None or self.max_connections > 0, "max_connections",
               self.max_connections, "must be > 0")
        _check(self.max_embedding_inputs > 0, "max_embedding_inputs", self.max_embedding_inputs, "must be > 0")
        _check(self.max_json_depth >= 4, "max_json_depth", self.max_json_depth, "must be >= 4")


UPLOAD_PATH = "/v1/files"


class BodyGuard:
    """ASGI middleware: reads a request's whole body under the size limit and the time limit, then
    hands it to the app. A Content-Length over the limit is refused before any byte is read, a body
    that grows past it as soon as it does, so a huge upload never sits in memory."""

    def __init__(self, app, limits: ServerLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limits.max_upload_bytes if scope["path"] == UPLOAD_PATH else self.limits.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return await _too_large(limit)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                err = APIError(408, f"The request body did not arrive within {self.limits.body_timeout_s:g} s.",
                               code="request_timeout", headers={"Connection": "close"})
                return await err.response()(scope, receive, send)
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await _too_large(limit)(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        try:
            await self.app(scope, replay, send)
        finally:
            if len(whole) >= TRIM_AFTER_BYTES:
                await loop.run_in_executor(None, trim_memory)


# A request this large leaves hundreds of MB of freed memory (a 5 MB prompt: its text, JSON, token ids,
# and the tokenizer's own allocations on worker threads) that glibc keeps in its arenas; returning it
# takes a few ms (bench/results/hostile.md: RSS after the barrage).
TRIM_AFTER_BYTES = 1 << 20


@functools.cache
def _libc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim_memory() -> None:
    """Give memory the allocator holds but no longer uses back to the system (glibc only)."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def _too_large(limit: int):
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large", headers={"Connection": "close"}).response()


def header_timeout_protocol(base: type, timeout_s: float) -> type:
    """A subclass of uvicorn's HTTP protocol class `base` that closes a connection whose next request
    head has not fully arrived `timeout_s` after the connection opened or its last response ended.
    uvicorn's own keep-alive timeout stops as soon as any byte arrives, so a client sending half its
    headers (slowloris) would otherwise hold the connection for ever."""

    class HeaderTimeoutProtocol(base):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._head_expired, self.cycle)

        def _head_expired(self, cycle_then) -> None:
            # A new cycle object means the next request's head arrived in time.
            if self.cycle is cycle_then and not self.transport.is_closing():
                self.transport.close()

    HeaderTimeoutProtocol.__name__ = HeaderTimeoutProtocol.__qualname__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


def uvicorn_settings(limits: ServerLimits) -> dict:
    """Keyword arguments for uvicorn.Config that apply `limits`."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string
    base = import_from_string(HTTP_PROTOCOLS["auto"])
    return {"http": header_timeout_protocol(base, limits.header_timeout_s),
            "limit_concurrency": limits.max_connections}
