"""Prometheus metrics through prometheus_client: request latencies and token counts recorded as requests
stream, the engine's live state read at scrape time, and the process's own metrics (CPU, memory, open
files). One registry per server, so several servers in one process (tests) never collide. With
PROMETHEUS_MULTIPROC_DIR set (gunicorn, Ray replicas), /metrics aggregates every worker process."""

from __future__ import annotations

import os
import time
from typing import AsyncIterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from keel.outputs import RequestOutput

# `_created` timestamps beside every counter and histogram double the series for no use here.
prometheus_client.disable_created_metrics()

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
FINISH_REASONS = ("stop", "length", "abort")


class _EngineState:
    """The engine's gauges and kernel table, read when /metrics is scraped."""

    def __init__(self) -> None:
        self.client = None  # keel.engine.async_engine.AsyncEngine

    def collect(self):
        client = self.client
        if client is None:
            return
        stats = client.stats()
        for name, help, value in (
                ("keel_requests_running", "Sequences in the running batch (a request with n > 1 counts n).",
                 stats.num_running),
                ("keel_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
                ("keel_requests_running_max", "Most sequences that ran in one engine step since start.",
                 stats.max_running_seen),
                ("keel_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by requests (0 to 1).",
                 float(stats.kv_cache_usage))):
            yield GaugeMetricFamily(name, help, value=value)
        yield CounterMetricFamily(
            "keel_engine_loop_restarts",
            "Failures that escaped an engine step; each ended the requests in flight, and the loop went on.",
            value=stats.num_restarts)
        backend = client.info.backend
        if backend is not None:
            info = GaugeMetricFamily("keel_kernel_info", "1 for each layer kind and the implementation that "
                                     "computes it (chosen once at start).", labels=["layer", "impl", "isa", "batch_invariant"])
            for kind, impl in backend.table().items():
                info.add_metric([kind, impl, backend.isa or "none", str(backend.batch_invariant).lower()], 1)
            yield info


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ttft = Histogram("keel_time_to_first_token_seconds",
                              "Time from receiving a request to its first generated token.",
                              buckets=TTFT_BUCKETS, registry=reg)
        self.tpot = Histogram("keel_time_per_output_token_seconds",
                              "Time between successive output tokens of a request (one engine step).",
                              buckets=TPOT_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("keel_prompt_tokens", "Prompt tokens of admitted requests.", registry=reg)
        self.generation_tokens = Counter("keel_generation_tokens", "Generated tokens, all choices included.",
                                         registry=reg)
        self.finished = Counter("keel_requests", "Finished engine requests by finish reason: 'length' if any "
                                "choice hit its token limit, 'abort' if the client left before the end, else 'stop'.",
                                ["finish_reason"], registry=reg)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)  # every reason shows, at 0 until it happens
        self.key_requests = Counter("keel_api_key_requests", "Requests per API key (its id, never the secret) "
                                    "and model, by outcome.", ["key_id", "model", "outcome"], registry=reg)
        self.key_tokens = Counter("keel_api_key_tokens", "Tokens per API key and model, prompt and completion.",
                                  ["key_id", "model", "kind"], registry=reg)
        self.guardrail = Counter("keel_guardrail_hits", "Content policy rules that matched, by policy, rule, "
                                 "where (prompt or answer) and action (block or flag; redactions are not counted "
                                 "here).", ["policy", "rule", "where", "action"], registry=reg)
        self._engine = _EngineState()
        reg.register(self._engine)
        ProcessCollector(registry=reg)

    def key_usage(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int, error: bool) -> None:
        self.key_requests.labels(key_id, model, "error" if error else "ok").inc()
        self.key_tokens.labels(key_id, model, "prompt").inc(prompt_tokens)
        self.key_tokens.labels(key_id, model, "completion").inc(completion_tokens)

    async def track(self, source: AsyncIterator[RequestOutput], arrival: float) -> AsyncIterator[RequestOutput]:
        """Passes one engine request's outputs through, recording its latencies and token counts.
        A request that yielded something and then stopped early (client gone) counts as aborted."""
        first = last = None
        reason = None
        try:
            async for out in source:
                now = time.monotonic()
                new = sum(len(o.delta_token_ids) for o in out.outputs)
                if first is None:
                    first = now
                    self.prompt_tokens.inc(len(out.prompt_token_ids))
                    self.ttft.observe(now - arrival)
                elif new:
                    self.tpot.observe(now - last)
                last = now
                self.generation_tokens.inc(new)
                if out.finished:
                    reasons = {o.finish_reason for o in out.outputs}
                    reason = "length" if "length" in reasons else "abort" if "abort" in reasons else "stop"
                yield out
        finally:
            if first is not None:
                self.finished.labels(reason or "abort").inc()
            await source.aclose()

    def render(self, client) -> str:
        self._engine.client = client
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return prometheus_client.generate_latest(reg).decode() + prometheus_client.generate_latest(
                _only(self._engine)).decode()
        return prometheus_client.generate_latest(self.registry).decode()


def _only(collector) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    return reg
