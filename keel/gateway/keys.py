"""Who may call what, how often: API keys from the database (keel.store.keys), the request and token
rate limits of each (sliding one-minute windows, per process), its token budget, and its usage.

The server's single `--api-key` keeps working beside them, as an admin key."""

from __future__ import annotations

import concurrent.futures
import hmac
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from keel.store.keys import APIKey, KeyStore

WINDOW_S = 60.0
ADMIN = APIKey("admin", "--api-key", "", 0, None, True, None, None, None, None)  # the server's own key


@dataclass
class Limited:
    """A request refused by a limit: 429 with these headers."""
    message: str
    code: str
    retry_after: float
    headers: dict[str, str] = field(default_factory=dict)


class RateWindows:
    """Requests and tokens of each key over the last minute."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}

    def _trim(self, key_id: str, now: float) -> tuple[deque, deque]:
        reqs = self._requests.setdefault(key_id, deque())
        toks = self._tokens.setdefault(key_id, deque())
        while reqs and reqs[0] <= now - WINDOW_S:
            reqs.popleft()
        while toks and toks[0][0] <= now - WINDOW_S:
            toks.popleft()
        return reqs, toks

    def admit(self, key: APIKey, now: float | None = None) -> Limited | dict[str, str]:
        """Count a request against the key's limits: the x-ratelimit-* headers when it may go on, else Limited."""
        now = time.monotonic() if now is None else now
        with self._lock:
            reqs, toks = self._trim(key.id, now)
            used = sum(n for _, n in toks)
            if key.rpm is not None and len(reqs) >= key.rpm:
                wait = reqs[0] + WINDOW_S - now
                return Limited(f"Rate limit reached for requests: {key.rpm} per minute. Retry in {wait:.1f}s.",
                               "rate_limit_exceeded", wait, self._headers(key, reqs, toks, now))
            if key.tpm is not None and used >= key.tpm:
                wait = toks[0][0] + WINDOW_S - now
                return Limited(f"Rate limit reached for tokens: {key.tpm} per minute (used {used}). Retry in "
                               f"{wait:.1f}s.", "rate_limit_exceeded", wait, self._headers(key, reqs, toks, now))
            reqs.append(now)
            return self._headers(key, reqs, toks, now)

    def add_tokens(self, key_id: str, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(key_id, now)[1].append((now, tokens))

    @staticmethod
    def _headers(key: APIKey, reqs: deque, toks: deque, now: float) -> dict[str, str]:
        """OpenAI's rate-limit headers: limits, what remains, and when the window frees up."""
        h = {}
        if key.rpm is not None:
            h["x-ratelimit-limit-requests"] = str(key.rpm)
            h["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - len(reqs)))
            h["x-ratelimit-reset-requests"] = f"{max(0.0, reqs[0] + WINDOW_S - now) if reqs else 0.0:.3f}s"
        if key.tpm is not None:
            h["x-ratelimit-limit-tokens"] = str(key.tpm)
            h["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - sum(n for _, n in toks)))
            h["x-ratelimit-reset-tokens"] = f"{max(0.0, toks[0][0] + WINDOW_S - now) if toks else 0.0:.3f}s"
        return h


class KeyAuth:
    """Authenticates a bearer token: the server's --api-key (admin), or a live key of the store."""

    def __init__(self, store: KeyStore | None, static_key: str | None = None) -> None:
        self.store, self.static_key = store, static_key
        self.windows = RateWindows()
        self.on_record = None  # called with (key_id, model, prompt, completion, error) for each metered request
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keel-usage")

    def record(self, key: APIKey, model: str, prompt_tokens: int, completion_tokens: int, error: bool,
               latency_ms: float) -> None:
        """Count one request's tokens in the key's rate window now and in its stored usage soon (one
        writer thread, in order, off the event loop)."""
        self.windows.add_tokens(key.id, prompt_tokens + completion_tokens)
        if self.on_record is not None:
            self.on_record(key.id, model, prompt_tokens, completion_tokens, error)
        if self.store is not None and key is not ADMIN:
            self._writer.submit(self.store.record, key.id, model, prompt_tokens, completion_tokens, error, latency_ms)

    def flush(self) -> None:
        """Wait until every usage record submitted so far is written."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    @property
    def required(self) -> bool:
        return self.store is not None or self.static_key is not None

    def authenticate(self, token: str) -> APIKey | None:
        """The key this token is, or None. Blocking (a database read): call it off the event loop."""
        if self.static_key is not None and hmac.compare_digest(token.encode("utf-8", "surrogateescape"),
                                                               self.static_key.encode()):
            return ADMIN
        if self.store is None or not token:
            return None
        return self.store.lookup(token)

    def check_budget(self, key: APIKey) -> Limited | None:
        """Blocking (a database read)."""
        if key.budget_tokens is None or self.store is None:
            return None
        used = self.store.tokens_used(key.id)
        if used >= key.budget_tokens:
            return Limited(f"This key has used its budget of {key.budget_tokens} tokens ({used} used).",
                           "insufficient_quota", 0.0)
        return None


class RequestUsage:
    """Tokens of one HTTP request over its engine requests; recorded once the last of them ends."""

    def __init__(self, auth: KeyAuth, key: APIKey, model: str, arrival: float) -> None:
        self.auth, self.key, self.model, self.arrival = auth, key, model, arrival
        self.prompt_tokens = self.completion_tokens = 0
        self.error = False
        self.open = 0

    def finish_one(self, prompt_tokens: int, completion_tokens: int, error: bool) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.error |= error
        self.open -= 1
        if self.open == 0:
            self.auth.record(self.key, self.model, self.prompt_tokens, self.completion_tokens, self.error,
                             1e3 * (time.monotonic() - self.arrival))


class RateLimitHeaders:
    """ASGI middleware: the x-ratelimit-* headers of the request's key (set by the server's auth on
    request.state) on every answer, streams included, without buffering anything."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get("state", {}).get("ratelimit_headers")
                if extra:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      *((k.encode(), v.encode()) for k, v in extra.items())]}
            await send(message)
        await self.app(scope, receive, send_with_headers)
