"""The gateway's /metrics: answers by model, backend and outcome, failovers and why, and each backend's
state (up, circuit open, requests in flight) read at scrape time."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily


class _BackendState:
    def __init__(self, router) -> None:
        self.router = router

    def collect(self):
        up = GaugeMetricFamily("keel_gateway_backend_up", "1 when the backend's last health check passed.",
                               labels=["backend"])
        circuit = GaugeMetricFamily("keel_gateway_backend_circuit_open", "1 while the backend's circuit is open.",
                                    labels=["backend"])
        flight = GaugeMetricFamily("keel_gateway_backend_in_flight", "Requests the gateway has on the backend now.",
                                   labels=["backend"])
        now = time.monotonic()
        for b in self.router.backends.values():
            up.add_metric([b.label], int(b.healthy))
            circuit.add_metric([b.label], int(now < b.open_until))
            flight.add_metric([b.label], b.in_flight)
        yield from (up, circuit, flight)


class GatewayMetrics:
    def __init__(self, router) -> None:
        self.registry = reg = CollectorRegistry()
        self.answers = Counter("keel_gateway_answers", "Answers by model, backend and outcome: ok, client_error "
                               "(a 4xx passed on), mid_stream_error, unavailable (every backend failed).",
                               ["model", "backend", "outcome"], registry=reg)
        self.failovers = Counter("keel_gateway_failovers", "Attempts given up on a backend before the first byte, "
                                 "by why (connection, timeout, down, status).", ["model", "backend", "reason"],
                                 registry=reg)
        reg.register(_BackendState(router))

    def render(self) -> bytes:
        return generate_latest(self.registry)
