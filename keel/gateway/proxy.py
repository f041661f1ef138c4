"""The gateway's HTTP app: OpenAI's API in front of several backends, with failover.

A request goes to its model's backends in order (keel.gateway.backends.Router.candidates). A connection
error, a timeout, a 429 or a 5xx, or the backend found down by its health check, before the first byte
of the answer reaches the client: the next backend is tried (after a short backoff), invisibly. After
the first byte, a streamed answer that breaks ends with an error event (`data: {"error": ...}`), which the
OpenAI SDKs raise: the gateway never splices text from another backend into an answer. Other 4xx answers
are the client's mistake and are passed on as they are. Each answer names its backend in
`x-keel-backend`; `system_fingerprint` stays the backend's own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from keel.gateway.backends import Backend, Router
from keel.gateway.config import GatewayConfig
from keel.gateway.metrics import GatewayMetrics
from keel.server import errors
from keel.server.errors import APIError, model_not_found

log = logging.getLogger("keel.gateway")
ROUTES = ("/chat/completions", "/completions", "/embeddings", "/responses")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_BODY_BYTES = 32 * 2**20  # as keel serve's --max-request-bytes default


class _Down(Exception):
    """The backend's health check found it down while a request waited on it."""


def _error(status: int, message: str, code: str, type_: str = "invalid_request_error", param=None) -> Response:
    return APIError(status, message, type=type_, code=code, param=param).response()


async def _unless_down(aw, backend: Backend, timeout: float):
    """Await `aw`, or raise _Down when the backend's health check finds it down first (it cancels the
    tasks waiting on it: keel.gateway.backends.Backend.mark), or TimeoutError after `timeout`. No task is
    created: this is on every request's path."""
    task = asyncio.current_task()
    backend.waiting.add(task)
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except asyncio.CancelledError:
        if task in backend.cut and task.uncancel() == 0:
            raise _Down(backend.label) from None
        raise
    finally:
        backend.waiting.discard(task)
        backend.cut.discard(task)


def create_gateway_app(settings: GatewayConfig, api_key: str | None = None) -> FastAPI:
    router = Router(settings)
    metrics = GatewayMetrics(router)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    state = {"client": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=5.0)) as client:
            state["client"] = client
            health = asyncio.create_task(router.health_loop(client))
            yield
            health.cancel()

    app = FastAPI(title="keel gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router
    app.state.metrics = metrics
    errors.install(app)  # unknown routes, wrong methods and anything unexpected answer in OpenAI's error shape

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"),
                                                                  api_key.encode())

    @app.get("/health")
    async def health():
        up = [b.label for b in router.backends.values() if b.healthy]
        return JSONResponse({"status": "ok" if up else "error", "backends_up": up}, status_code=200 if up else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "keel"}
                                           for n in router.served_names()]}

    for path in ROUTES:
        app.add_api_route("/v1" + path, _make_route(path, router, metrics, state, authorized), methods=["POST"])
    return app


def _make_route(path: str, router: Router, metrics: GatewayMetrics, state: dict, authorized):
    async def route(request: Request):
        if not authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            return _error(413, f"The request body is over {MAX_BODY_BYTES} bytes.", "request_too_large")
        raw = b""
        async for part in request.stream():  # chunked bodies too: stop as soon as one is too large
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                return _error(413, f"The request body is over {MAX_BODY_BYTES} bytes.", "request_too_large")
        try:
            body = json.loads(raw)
            model = body["model"]
            assert isinstance(body, dict) and isinstance(model, str)
        except (ValueError, KeyError, TypeError, AssertionError):
            return _error(400, "The body must be a JSON object with a `model` string.", "invalid_request", param="model")
        return await _forward(path, raw, body, model, bool(body.get("stream")), router, metrics, state["client"])
    return route


async def _forward(path: str, raw: bytes, body: dict, model: str, stream: bool, router: Router,
                   metrics: GatewayMetrics, client: httpx.AsyncClient):
    candidates = router.candidates(model)
    if not candidates:
        return model_not_found(model).response()
    settings = router.settings
    deadline = time.monotonic() + router.timeout_for(model)
    last = "no backend answered"
    for attempt in range(settings.retries + 1):
        backend, upstream = candidates[attempt % len(candidates)]
        if attempt:
            await asyncio.sleep(min(settings.backoff_s * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic())))
        left = deadline - time.monotonic()
        if left <= 0:
            break
        backend.in_flight += 1
        done = False
        resp = None
        try:
            content = raw if upstream == model else json.dumps({**body, "model": upstream}).encode()
            req = client.build_request("POST", backend.url + path, content=content,
                                       headers={"content-type": "application/json", **backend.headers()})
            resp = await _unless_down(client.send(req, stream=True), backend, left)
            if resp.status_code in RETRY_STATUS:
                text = (await resp.aread())[:300].decode(errors="replace")
                await resp.aclose()
                last = f"{backend.label} answered {resp.status_code}: {text}"
                metrics.failovers.labels(model, backend.label, f"status {resp.status_code}").inc()
                if resp.status_code != 429:
                    backend.failed(f"HTTP {resp.status_code}")
                continue
            headers = {"x-keel-backend": backend.label}
            if not stream or resp.status_code != 200:
                content = await _unless_down(resp.aread(), backend, deadline - time.monotonic())
                await resp.aclose()
                backend.succeeded()
                metrics.answers.labels(model, backend.label, "ok" if resp.status_code < 400 else "client_error").inc()
                return Response(content, resp.status_code, headers=headers,
                                media_type=resp.headers.get("content-type", "application/json"))
            chunks = resp.aiter_raw()
            first = await _unless_down(chunks.__anext__(), backend, deadline - time.monotonic())
            backend.succeeded()
            done = True  # the relay owns the response and the in-flight count from here
            outcomes = (metrics.answers.labels(model, backend.label, "ok"),
                        metrics.answers.labels(model, backend.label, "mid_stream_error"))
            return StreamingResponse(_relay(first, chunks, resp, backend, *outcomes), headers=headers,
                                     media_type="text/event-stream")
        except (httpx.HTTPError, _Down, TimeoutError, StopAsyncIteration) as e:
            last = f"{backend.label}: {type(e).__name__} {e}".strip()
            backend.failed(type(e).__name__)
            reason = "down" if isinstance(e, _Down) else "timeout" if isinstance(e, (TimeoutError, httpx.TimeoutException)) \
                else "connection"
            metrics.failovers.labels(model, backend.label, reason).inc()
            if resp is not None:  # found down or timed out while reading: free the connection
                await resp.aclose()
        finally:
            if not done:
                backend.in_flight -= 1
    metrics.answers.labels(model, "none", "unavailable").inc()
    return _error(503, f"No backend could serve `{model}` ({last}). Retry later.", "backends_unavailable",
                  type_="server_error")


async def _relay(first: bytes, chunks, resp: httpx.Response, backend: Backend, ok, broken):
    """The stream's bytes as they come; if the backend breaks, an error event the SDKs raise, then the end.
    ok, broken: the counters of the two outcomes."""
    watcher = asyncio.create_task(_close_when_down(resp, backend))
    tail = first
    try:
        yield first
        async for chunk in chunks:
            tail = chunk
            yield chunk
        ok.inc()
    except (httpx.HTTPError, RuntimeError) as e:
        broken.inc()
        backend.failed(f"mid-stream {type(e).__name__}")
        sep = b"" if tail.endswith(b"\n\n") else b"\n\n"  # never leave half an event before the error
        err = {"error": {"message": f"The backend {backend.label} failed while streaming this answer; what came "
                                    f"before is all there is. Retry the request.", "type": "server_error",
                         "param": None, "code": "backend_failed_mid_stream"}}
        yield sep + b"data: " + json.dumps(err).encode() + b"\n\n"
    finally:
        watcher.cancel()
        backend.in_flight -= 1
        await resp.aclose()


async def _close_when_down(resp: httpx.Response, backend: Backend) -> None:
    await backend.down.wait()
    await resp.aclose()
