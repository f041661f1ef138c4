"""API keys: each a random secret shown once at creation and kept only as its sha256 (a leaked database
holds no usable key), scoped to model and adapter names, with request and token limits, a token
budget, and usage per key and model."""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa

from keel.store.db import Database, api_keys, dumps, key_usage, loads, row

PREFIX = "sk-keel-"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class APIKey:
    id: str
    name: str
    hint: str
    created_at: int
    revoked_at: int | None
    admin: bool
    models: tuple[str, ...] | None  # name patterns (fnmatch: "acme-*"); None: every model
    rpm: int | None
    tpm: int | None
    budget_tokens: int | None

    @classmethod
    def from_row(cls, r: dict) -> APIKey:
        models = loads(r["models"])
        return cls(r["id"], r["name"], r["hint"], r["created_at"], r["revoked_at"], bool(r["admin"]),
                   None if models is None else tuple(models), r["rpm"], r["tpm"], r["budget_tokens"])

    def allows(self, model: str) -> bool:
        """This key may see and call `model` (a served model or an adapter name)."""
        return self.admin or self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def card(self) -> dict:
        return {"id": self.id, "object": "api_key", "name": self.name, "hint": "..." + self.hint,
                "created_at": self.created_at, "revoked_at": self.revoked_at, "admin": self.admin,
                "models": None if self.models is None else list(self.models), "rpm": self.rpm, "tpm": self.tpm,
                "budget_tokens": self.budget_tokens}


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str, models: list[str] | None = None, rpm: int | None = None, tpm: int | None = None,
               budget_tokens: int | None = None, admin: bool = False) -> tuple[APIKey, str]:
        """(the key, its secret): the secret exists only in this return value."""
        for field, value in (("rpm", rpm), ("tpm", tpm), ("budget_tokens", budget_tokens)):
            if value is not None and value <= 0:
                raise ValueError(f"{field} must be > 0, got {value}")
        secret = PREFIX + secrets.token_urlsafe(32)
        record = {"id": f"key-{secrets.token_hex(8)}", "name": name, "hash": digest(secret), "hint": secret[-4:],
                  "created_at": int(time.time()), "revoked_at": None, "admin": admin,
                  "models": dumps(None if models is None else list(models)), "rpm": rpm, "tpm": tpm,
                  "budget_tokens": budget_tokens}
        with self.db.begin() as c:
            record["seq"] = c.execute(sa.select(sa.func.coalesce(sa.func.max(api_keys.c.seq), 0))).scalar() + 1
            c.execute(api_keys.insert().values(**record))
        return APIKey.from_row(record), secret

    def lookup(self, secret: str) -> APIKey | None:
        """The live (not revoked) key with this secret, or None."""
        with self.db.begin() as c:
            r = row(c.execute(api_keys.select().where(api_keys.c.hash == digest(secret))).first())
        key = None if r is None else APIKey.from_row(r)
        return key if key is not None and key.revoked_at is None else None

    def get(self, key_id: str) -> APIKey | None:
        with self.db.begin() as c:
            r = row(c.execute(api_keys.select().where(api_keys.c.id == key_id)).first())
        return None if r is None else APIKey.from_row(r)

    def list(self, include_revoked: bool = False) -> list[APIKey]:
        q = api_keys.select().order_by(api_keys.c.seq)
        if not include_revoked:
            q = q.where(api_keys.c.revoked_at.is_(None))
        with self.db.begin() as c:
            return [APIKey.from_row(row(r)) for r in c.execute(q)]

    def revoke(self, key_id: str) -> bool:
        """True when a live key was revoked now."""
        with self.db.begin() as c:
            return c.execute(api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                             .values(revoked_at=int(time.time()))).rowcount > 0

    def record(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int, error: bool,
               latency_ms: float) -> None:
        """Add one request to the key's usage of `model`."""
        try:
            self._record(key_id, model, prompt_tokens, completion_tokens, error, latency_ms)
        except sa.exc.IntegrityError:  # another thread inserted the row first: it exists now
            self._record(key_id, model, prompt_tokens, completion_tokens, error, latency_ms)

    def _record(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int, error: bool,
                latency_ms: float) -> None:
        with self.db.begin() as c:
            where = (key_usage.c.key_id == key_id) & (key_usage.c.model == model)
            done = c.execute(key_usage.update().where(where).values(
                requests=key_usage.c.requests + 1, errors=key_usage.c.errors + int(error),
                prompt_tokens=key_usage.c.prompt_tokens + prompt_tokens,
                completion_tokens=key_usage.c.completion_tokens + completion_tokens,
                latency_ms=key_usage.c.latency_ms + latency_ms)).rowcount
            if not done:
                c.execute(key_usage.insert().values(key_id=key_id, model=model, requests=1, errors=int(error),
                                                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                    latency_ms=latency_ms))

    def usage(self, key_id: str | None = None) -> list[dict]:
        """Rows of {key_id, model, requests, errors, prompt_tokens, completion_tokens, latency_ms}."""
        q = key_usage.select().order_by(key_usage.c.key_id, key_usage.c.model)
        if key_id is not None:
            q = q.where(key_usage.c.key_id == key_id)
        with self.db.begin() as c:
            return [row(r) for r in c.execute(q)]

    def tokens_used(self, key_id: str) -> int:
        with self.db.begin() as c:
            return int(c.execute(sa.select(sa.func.coalesce(sa.func.sum(
                key_usage.c.prompt_tokens + key_usage.c.completion_tokens), 0)).where(
                key_usage.c.key_id == key_id)).scalar())
