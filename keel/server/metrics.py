"""Prometheus metrics, written in the text exposition format by hand (it is a few lines of format and
not worth a dependency). Updated on the event loop only, so plain ints and floats suffice."""

from __future__ import annotations

import bisect
import time
from typing import AsyncIterator

from keel.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
FINISH_REASONS = ("stop", "length", "abort")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, count in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            total += count  # Prometheus buckets are cumulative
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out += [f"{name}_sum {_num(self.sum)}", f"{name}_count {total}"]
        return out


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


class Metrics:
    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)

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
                    self.prompt_tokens += len(out.prompt_token_ids)
                    self.ttft.observe(now - arrival)
                elif new:
                    self.tpot.observe(now - last)
                last = now
                self.generation_tokens += new
                if out.finished:
                    reasons = {o.finish_reason for o in out.outputs}
                    reason = "length" if "length" in reasons else "abort" if "abort" in reasons else "stop"
                yield out
        finally:
            if first is not None:
                self.finished[reason or "abort"] += 1
            await source.aclose()

    def render(self, aeng) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, body: list[str]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *body])

        metric("keel_requests_running", "gauge", "Sequences in the running batch (a request with n > 1 counts n).",
               [f"keel_requests_running {aeng.num_running}"])
        metric("keel_requests_waiting", "gauge", "Requests waiting to be scheduled.",
               [f"keel_requests_waiting {aeng.num_waiting}"])
        metric("keel_requests_running_max", "gauge", "Most sequences that ran in one engine step since start.",
               [f"keel_requests_running_max {aeng.max_running_seen}"])
        metric("keel_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks held by requests (0 to 1).",
               [f"keel_kv_cache_usage_ratio {_num(float(aeng.kv_cache_usage))}"])
        metric("keel_time_to_first_token_seconds", "histogram",
               "Time from receiving a request to its first generated token.",
               self.ttft.lines("keel_time_to_first_token_seconds"))
        metric("keel_time_per_output_token_seconds", "histogram",
               "Time between successive output tokens of a request (one engine step).",
               self.tpot.lines("keel_time_per_output_token_seconds"))
        metric("keel_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
               [f"keel_prompt_tokens_total {self.prompt_tokens}"])
        metric("keel_generation_tokens_total", "counter", "Generated tokens, all choices included.",
               [f"keel_generation_tokens_total {self.generation_tokens}"])
        metric("keel_engine_loop_restarts_total", "counter",
               "Failures that escaped an engine step; each ended the requests in flight, and the loop went on.",
               [f"keel_engine_loop_restarts_total {aeng.num_restarts}"])
        metric("keel_requests_total", "counter",
               "Finished engine requests by finish reason: 'length' if any choice hit its token limit, "
               "'abort' if the client left before the end, else 'stop'.",
               [f'keel_requests_total{{finish_reason="{r}"}} {c}' for r, c in self.finished.items()])
        backend = getattr(aeng.engine, "backend", None)
        if backend is not None:
            def esc(v: str) -> str:
                return v.replace("\\", "\\\\").replace('"', '\\"')
            metric("keel_kernel_info", "gauge",
                   "1 for each layer kind and the implementation that computes it (chosen once at start).",
                   [f'keel_kernel_info{{layer="{esc(k)}",impl="{esc(v)}",isa="{backend.isa or "none"}",'
                    f'batch_invariant="{str(backend.batch_invariant).lower()}"}} 1' for k, v in backend.table().items()])
        return "\n".join(lines) + "\n"
