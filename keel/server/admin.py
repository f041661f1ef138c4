"""/admin: API keys (create, list, revoke) and their usage, for an admin key or the server's --api-key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.server.common import get_state, read_body
from keel.server.errors import APIError, shown

router = APIRouter(include_in_schema=False)


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    models: list[Annotated[str, Field(min_length=1, max_length=512)]] | None = Field(default=None, max_length=1024)
    """Model and adapter name patterns (fnmatch); None: every model."""
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    budget_tokens: int | None = Field(default=None, gt=0)
    admin: bool = False


def _store(request: Request):
    store = get_state(request).auth.store
    if store is None:
        raise APIError(400, "This server keeps no API keys: start it with --api-keys.", code="api_keys_disabled")
    return store


@router.get("/keys")
async def list_keys(request: Request):
    keys = await run_in_threadpool(_store(request).list, True)
    return {"object": "list", "data": [k.card() for k in keys]}


@router.post("/keys")
async def create_key(request: Request):
    body = await read_body(request, CreateKeyRequest)
    key, secret = await run_in_threadpool(_store(request).create, body.name, body.models, body.rpm, body.tpm,
                                          body.budget_tokens, body.admin)
    return {**key.card(), "key": secret}  # the only time the secret is shown


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request):
    if not await run_in_threadpool(_store(request).revoke, key_id):
        raise APIError(404, f"No live API key `{shown(key_id)}`.", code="not_found", param="key_id")
    return {"id": key_id, "object": "api_key.deleted", "deleted": True}


@router.get("/usage")
async def usage(request: Request, key_id: str | None = None):
    rows = await run_in_threadpool(_store(request).usage, key_id)
    return {"object": "list", "data": rows}
