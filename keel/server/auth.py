"""Who may call /v1 and /admin: the bearer token (the server's --api-key, or a key of the database),
its rate limits and budget (keel.gateway.keys)."""

from __future__ import annotations

import math

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from keel.gateway.keys import ADMIN, Limited
from keel.server.common import get_state, key_of
from keel.server.errors import APIError


async def require_api_key(request: Request) -> None:
    """Authenticate the bearer token (the server's --api-key, or a key of the database when --api-keys
    is on), then apply the key's request and token rate limits and its token budget."""
    auth = get_state(request).auth
    if not auth.required:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="keel"'}
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers=challenge)
    token = token.strip()
    key = auth.authenticate(token) if auth.store is None else await run_in_threadpool(auth.authenticate, token)
    if key is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=challenge)
    request.state.api_key = key
    if key is ADMIN:
        return
    admitted = auth.windows.admit(key)
    if isinstance(admitted, Limited):
        raise _limited(admitted)
    over = await run_in_threadpool(auth.check_budget, key)
    if over is not None:
        raise _limited(over)
    request.state.ratelimit_headers = admitted


def _limited(limit: Limited) -> APIError:
    headers = dict(limit.headers)
    if limit.retry_after > 0:
        headers["Retry-After"] = str(max(1, math.ceil(limit.retry_after)))
    return APIError(429, limit.message, type="requests" if limit.code == "rate_limit_exceeded" else "insufficient_quota",
                    code=limit.code, headers=headers)


async def require_admin(request: Request) -> None:
    key = key_of(request)
    if key is not None and not key.admin:
        raise APIError(403, "This API key cannot manage keys: an admin key (or the server's --api-key) can.",
                       type="permission_error", code="admin_required")
    if key is None:
        raise APIError(403, "Key management needs API keys: start the server with --api-keys and an admin key.",
                       type="permission_error", code="admin_required")
