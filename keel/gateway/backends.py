"""The backends behind the gateway: health (a GET /models every interval, which also says what each
serves), load (requests in flight), a circuit breaker each, and the order a request tries them in."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from keel.gateway.config import BackendConfig, GatewayConfig

log = logging.getLogger("keel.gateway")


class Backend:
    def __init__(self, cfg: BackendConfig, settings: GatewayConfig) -> None:
        self.url, self.label, self.api_key = cfg.url, cfg.label, cfg.api_key
        self.settings = settings
        self.healthy = True  # until the first check says otherwise
        self.models: set[str] = set()
        self.in_flight = 0
        self.failures = 0  # consecutive
        self.open_until = 0.0
        self.down = asyncio.Event()  # set when the backend is found down: streams from it end
        self.waiting: set[asyncio.Task] = set()  # tasks awaiting this backend's answer (see proxy._unless_down)
        self.cut: set[asyncio.Task] = set()  # those cancelled because it went down

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.open_until

    def succeeded(self) -> None:
        self.failures, self.open_until = 0, 0.0

    def failed(self, why: str) -> None:
        self.failures += 1
        log.warning("backend %s failed (%s); %d in a row", self.label, why, self.failures)
        if self.failures >= self.settings.circuit_failures:
            self.open_until = time.monotonic() + self.settings.circuit_cooldown_s
            log.warning("backend %s: circuit open for %.1f s", self.label, self.settings.circuit_cooldown_s)

    def mark(self, healthy: bool, models: set[str] | None = None) -> None:
        if models is not None:
            self.models = models
        if healthy == self.healthy:
            return
        self.healthy = healthy
        log.warning("backend %s is %s", self.label, "up" if healthy else "down")
        if healthy:
            self.down = asyncio.Event()
            self.succeeded()
        else:
            self.down.set()
            for task in list(self.waiting):
                self.cut.add(task)
                task.cancel()


class Router:
    def __init__(self, settings: GatewayConfig) -> None:
        self.settings = settings
        self.backends: dict[str, Backend] = {}  # by URL: one state per server, whatever aliases use it
        self.routes: dict[str, list[tuple[int, Backend, str]]] = {}  # alias -> (priority, backend, upstream model)
        for alias, spec in settings.models.items():
            for b in spec.backends:
                backend = self.backends.setdefault(b.url, Backend(b, settings))
                self.routes.setdefault(alias, []).append((b.priority, backend, b.model or alias))

    def timeout_for(self, model: str) -> float:
        spec = self.settings.models.get(model)
        return spec.timeout_s if spec else max((s.timeout_s for s in self.settings.models.values()), default=300.0)

    def candidates(self, model: str) -> list[tuple[Backend, str]]:
        """(backend, the model name it knows) in the order to try: available ones by priority, the least
        loaded first among equals; then those down or with an open circuit, in case they are back."""
        routes = self.routes.get(model)
        if routes is None:  # no alias: the backends that serve this name themselves (an adapter, say)
            routes = [(0, b, model) for b in self.backends.values() if model in b.models]
        now = time.monotonic()
        ranked = sorted(routes, key=lambda r: (not r[1].available(now), r[0], r[1].in_flight))
        return [(b, m) for _, b, m in ranked]

    def served_names(self) -> list[str]:
        names = dict.fromkeys(self.routes)
        for b in self.backends.values():
            if b.healthy:
                names.update(dict.fromkeys(sorted(b.models)))
        return list(names)

    async def check(self, client: httpx.AsyncClient, backend: Backend) -> None:
        timeout = max(1.0, self.settings.health_check_interval_s)
        try:
            r = await client.get(backend.url + "/models", headers=backend.headers(), timeout=timeout)
            ok = r.status_code == 200
            models = {m.get("id") for m in r.json().get("data", []) if isinstance(m, dict)} if ok else None
        except (httpx.HTTPError, ValueError, AttributeError):
            ok, models = False, None
        backend.mark(ok, models)

    async def health_loop(self, client: httpx.AsyncClient) -> None:
        while True:
            await asyncio.gather(*(self.check(client, b) for b in self.backends.values()))
            await asyncio.sleep(self.settings.health_check_interval_s)
