"""What `keel gateway` costs in front of one `keel serve`: throughput kept at 32 streaming clients and
latency added per request, both against the same server reached directly, in the same run.

    .venv/bin/python -m bench.gateway [--clients 32] [--max-tokens 64] [--rounds 3] [--out bench/results/gateway.md]

Starts `keel serve` on the built-in model and `keel gateway` (one alias, that one backend) on free
loopback ports. Each round runs, direct and through the gateway in turn: N clients streaming at once
(output tokens/s), then one client sending small non-streaming requests one after another (max_tokens 1;
the latency p50). On a small machine the model server, the gateway and the clients fight for the same
cores, which shows in the per-request latency; so the gateway's own cost is also measured in front of an
instant backend (a minimal OpenAI-shaped app in its own process, no model). Goals (issue 19): >= 95% of
the throughput, < 2 ms added at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from bench.decode import machine
from bench.report import publish
from bench.serve import MODEL, free_port, pct, run_clients, wait_up


def latencies(base_url: str, n: int) -> list[float]:
    import httpx
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    out = []
    with httpx.Client(base_url=base_url, timeout=60) as c:
        for _ in range(n + 3):
            t = time.perf_counter()
            r = c.post("/chat/completions", json=body)
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return out[3:]  # the first few warm connections and caches


def instant_backend(port: int) -> None:
    """An OpenAI-shaped chat endpoint that answers at once (run in its own process)."""
    import uvicorn
    from fastapi import FastAPI, Request
    app = FastAPI()
    answer = {"id": "x", "object": "chat.completion", "created": 0, "model": "instant",
              "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "instant", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        await request.body()
        return answer
    uvicorn.run(app, port=port, log_level="warning")


def instant_overhead(rounds: int, n: int) -> list[tuple[float, float]]:
    """(direct p50 ms, gateway p50 ms) per round, in front of instant_backend."""
    import httpx
    bport, gport = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, "-m", "bench.gateway", "--instant-backend", str(bport)])
    cfg = os.path.join(tempfile.mkdtemp(), "instant.yaml")
    with open(cfg, "w") as f:
        f.write(f"models:\n  instant:\n    backends:\n      - url: http://127.0.0.1:{bport}/v1\n")
    gateway = subprocess.Popen([sys.executable, "-m", "keel.cli", "gateway", "--config", cfg, "--port", str(gport),
                                "--log-level", "WARNING"])
    body = {"model": "instant", "messages": [{"role": "user", "content": "Hi"}]}
    out = []
    try:
        wait_up(bport, "/v1/models")
        wait_up(gport)
        for _ in range(rounds):
            got = []
            for port in (bport, gport):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                    lat = []
                    for _ in range(n + 30):
                        t = time.perf_counter()
                        c.post("/v1/chat/completions", json=body)
                        lat.append(time.perf_counter() - t)
                got.append(pct(lat[30:], 0.5) * 1e3)
            out.append(tuple(got))
    finally:
        gateway.terminate()
        backend.terminate()
        gateway.wait(30)
        backend.wait(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instant-backend", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-requests", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.instant_backend:
        return instant_backend(args.instant_backend)
    instant = instant_overhead(args.rounds, 300)
    sport, gport = free_port(), free_port()
    keel = [sys.executable, "-m", "keel.cli"]
    server = subprocess.Popen(keel + ["serve", "--port", str(sport), "--no-fine-tuning", "--no-embedding-model",
                                      "--state-db", ":memory:", "--log-level", "WARNING"])
    cfg = os.path.join(tempfile.mkdtemp(), "gateway.yaml")
    with open(cfg, "w") as f:
        f.write(f"models:\n  {MODEL}:\n    backends:\n      - url: http://127.0.0.1:{sport}/v1\n")
    gateway = subprocess.Popen(keel + ["gateway", "--config", cfg, "--port", str(gport), "--log-level", "WARNING"])
    try:
        wait_up(sport)
        wait_up(gport)
        direct, via = f"http://127.0.0.1:{sport}/v1", f"http://127.0.0.1:{gport}/v1"
        asyncio.run(run_clients(direct, 4, 8))  # warm-up
        rows = []
        for r in range(args.rounds):
            order = [("direct", direct), ("gateway", via)] if r % 2 == 0 else [("gateway", via), ("direct", direct)]
            got = {}
            for name, url in order:
                tps = asyncio.run(run_clients(url, args.clients, args.max_tokens))["tps"]
                lat = latencies(url, args.latency_requests)
                got[name] = (tps, pct(lat, 0.5) * 1e3)
            rows.append(got)
            print(f"round {r + 1}: direct {got['direct'][0]:.1f} tok/s, p50 {got['direct'][1]:.2f} ms; gateway "
                  f"{got['gateway'][0]:.1f} tok/s, p50 {got['gateway'][1]:.2f} ms", flush=True)
    finally:
        gateway.terminate()
        server.terminate()
        gateway.wait(30)
        server.wait(30)
    ratios = sorted(g["gateway"][0] / g["direct"][0] for g in rows)
    added = sorted(g["gateway"][1] - g["direct"][1] for g in rows)
    med = ratios[len(ratios) // 2]
    lines = ["# keel gateway overhead", "", f"Machine: {machine()}", "",
             f"`python -m bench.gateway --clients {args.clients} --max-tokens {args.max_tokens} --rounds "
             f"{args.rounds}`: `keel serve` (built-in model) reached directly and through `keel gateway` (one "
             f"alias, that one backend), alternating order each round.", "",
             "| round | direct tok/s | gateway tok/s | ratio | direct p50 ms | gateway p50 ms | added ms |",
             "|---|---|---|---|---|---|---|"]
    for i, g in enumerate(rows):
        lines.append(f"| {i + 1} | {g['direct'][0]:.1f} | {g['gateway'][0]:.1f} | {g['gateway'][0] / g['direct'][0]:.3f} "
                     f"| {g['direct'][1]:.2f} | {g['gateway'][1]:.2f} | {g['gateway'][1] - g['direct'][1]:.2f} |")
    lines += ["", f"Median throughput kept: **{med:.3f}x** (goal >= 0.95); median latency added at p50 in front of "
                  f"the model: {added[len(added) // 2]:.2f} ms (the gateway, the server and the clients share "
                  f"this machine's cores, and the engine's own step time varies by more than that).", "",
              "In front of an instant backend (no model; 300 sequential requests per side and round):", "",
              "| round | direct p50 ms | gateway p50 ms | added ms |", "|---|---|---|---|"]
    for i, (d, g) in enumerate(instant):
        lines.append(f"| {i + 1} | {d:.2f} | {g:.2f} | {g - d:.2f} |")
    inst = sorted(g - d for d, g in instant)
    lines += ["", f"The gateway's own cost per request, median: **{inst[len(inst) // 2]:.2f} ms** (goal < 2 ms)."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
