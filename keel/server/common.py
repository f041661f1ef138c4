"""What every route module shares: the server's state, the request body read as a model, the time.

Routes import these from here, never from keel.server.app, which imports the routes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from keel.server.body import parse_json
from keel.server.errors import from_validation

if TYPE_CHECKING:
    from keel.server.app import ServerState

# Bodies larger than this are parsed and validated on a worker thread, so the event loop keeps serving.
OFFLOAD_BODY_BYTES = 256 * 1024


def get_state(request: Request) -> "ServerState":
    return request.app.state.keel


async def read_body(request: Request, model: type[BaseModel]):
    """The JSON body as `model`. Read by hand rather than by FastAPI so that a body sent without
    `Content-Type: application/json` (curl -d) is still read as JSON, as OpenAI's API does; checked
    for depth and bad text first (keel.server.body)."""
    raw = await request.body()
    depth = get_state(request).limits.max_json_depth
    if len(raw) > OFFLOAD_BODY_BYTES:
        return await run_in_threadpool(_parse_body, raw, model, depth)
    return _parse_body(raw, model, depth)


def _parse_body(raw: bytes, model: type[BaseModel], max_depth: int):
    data = parse_json(raw, max_depth)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e, data) from None


def key_of(request: Request):
    """The API key (keel.store.keys.APIKey) the request authenticated with; None when the server needs none."""
    return getattr(request.state, "api_key", None)


def now() -> int:
    return int(time.time())


def page(data: list[dict], has_more: bool) -> dict:
    """An OpenAI list object with cursor ids (as /v1/files and the checkpoints list return)."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
