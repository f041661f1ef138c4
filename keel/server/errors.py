"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with string type and code.

Every failure path ends here, so a client always gets JSON it can parse and never a traceback: the
traceback goes to the server log, under an id that the message quotes.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.engine.async_engine import EngineDeadError, QueueFullError
from keel.gateway.guardrails import PolicyViolation
from keel.errors import KeelError, LoRAError, LoRANotFoundError
from keel.server.protocol import RequestError
from keel.server.streaming import ClientDisconnected

log = logging.getLogger("keel.server")

RETRY_AFTER_S = 1  # queue-full is momentary under continuous batching; a short back-off is enough


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str = "invalid_request", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{shown(name)}` does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


def context_length_exceeded(limit: int, prompt: int, completion: int | None, where: str) -> APIError:
    if completion is None:
        msg = (f"This model's maximum context length is {limit} tokens. However, your {where} resulted in "
               f"{prompt} tokens, which leaves no room for a completion. Please reduce the length of the {where}.")
    else:
        msg = (f"This model's maximum context length is {limit} tokens. However, you requested "
               f"{prompt + completion} tokens ({prompt} in the {where}, {completion} in the completion). "
               f"Please reduce the length of the {where} or completion.")
    return APIError(400, msg, code="context_length_exceeded", param="messages" if where == "messages" else "prompt")


def from_exception(exc: BaseException) -> APIError:
    """The API error for anything raised while serving a request (also used inside streams)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, exc.message, code=exc.code, param=exc.param)
    if isinstance(exc, ClientDisconnected):  # nobody reads this; 499 as in nginx, for the access log
        return APIError(499, "The client closed the connection before the response was ready.",
                        code="client_disconnected")
    if isinstance(exc, QueueFullError):
        return APIError(429, f"The server is at capacity: {exc}. Please retry shortly.",
                        type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        log.error("request failed, the engine is down: %s", exc)
        return APIError(503, "The inference engine stopped after an internal error; the server must be restarted.",
                        type="server_error", code="engine_unavailable")
    if isinstance(exc, LoRANotFoundError):  # unloaded between the model check and the engine
        return APIError(404, f"The model does not exist: {exc}.", code="model_not_found", param="model")
    if isinstance(exc, LoRAError):  # the adapter a request names cannot be served
        return APIError(400, f"The model's LoRA adapter cannot be used: {exc}", code="invalid_lora_adapter",
                        param="model")
    if isinstance(exc, PolicyViolation):
        return APIError(400, str(exc), code="content_policy_violation",
                        param="messages" if exc.where == "prompt" else None)
    if isinstance(exc, KeelError):  # the engine's own validation (prompt tokens, stop ids, ...)
        return APIError(400, str(exc), code="invalid_value", param=getattr(exc, "param", None))
    if isinstance(exc, RecursionError):  # input nested past what some library walks recursively
        log.warning("a request nested too deeply", exc_info=exc)
        return APIError(400, "The request nests too deeply to be processed.", code="invalid_value")
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s", error_id, exc_info=exc)
    return APIError(500, f"The server had an error while processing your request (error id {error_id}).",
                    type="server_error", code="internal_error")


def path_str(path: tuple) -> str | None:
    """A location in a JSON body as OpenAI writes `param`: messages[0].content."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _param(loc: tuple) -> str | None:
    return path_str(tuple(p for p in loc if p != "body"))


def shown(text: str, limit: int = 200) -> str:
    """A client's string as quoted back in a message: cut, so a 5 MB model name is not echoed whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _located(loc: tuple, data) -> str | None:
    """`param` for an error at pydantic's `loc` in `data`: pydantic puts the names of union members
    ("str", "list[int]") in the path; only the steps that exist in the body are kept."""
    path, node = [], data
    for step in loc:
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif isinstance(node, dict) and isinstance(step, str) and len(path) == len(loc) - 1 and step not in node:
            path.append(step)  # a missing or unknown field: its name is the param
            break
        else:
            continue
        path.append(step)
    return path_str(tuple(path))


def from_validation(exc: RequestValidationError | ValidationError, data=None) -> APIError:
    """data: the parsed body, to name the param exactly (see _located)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    e = errors[0]
    loc = tuple(e.get("loc", ()))
    kind, param = e.get("type", ""), (_param(loc) if data is None else _located(loc, data))
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, RequestError):
        return APIError(400, cause.message, code=cause.code, param=cause.param or param)
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", code="unknown_parameter", param=param)
    if kind == "missing":
        if param is None:
            return APIError(400, "The request needs a JSON body.", code="missing_body")
        return APIError(400, f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:  # the body itself, e.g. a JSON array instead of an object
        return APIError(400, f"Invalid request body: {msg}", code="invalid_body")
    value = e.get("input")
    quoted = shown(repr(value)) if value is None or isinstance(value, (int, float, str, bool)) else type(value).__name__
    return APIError(400, f"Invalid value for '{param}' ({quoted}): {msg}", code="invalid_value", param=param)


async def _known(request: Request, exc: Exception):
    return from_exception(exc).response()


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return from_validation(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    # Registered by class so that user errors are answered by Starlette's ExceptionMiddleware and
    # not logged as server failures.
    for cls in (APIError, RequestError, KeelError, ClientDisconnected):
        app.add_exception_handler(cls, _known)

    app.add_middleware(CatchAll)


class CatchAll:
    """Answers an unexpected exception with a 500 error object (the traceback goes to the log).

    Starlette's own handler for Exception answers too, but then re-raises, and uvicorn drops the
    client's keep-alive connection; a client's next request on it would fail."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # too late for an error response; let the server close the connection
                raise
            await from_exception(exc).response()(scope, receive, send)
