"""`keel serve` under N concurrent streaming clients against offline `LLM.generate` on the same work.

    .venv/bin/python -m bench.serve [--clients 1,8,32] [--max-tokens 64] [--out bench/results/serve.md]

Starts `keel serve` on the built-in model on a free loopback port, then for each N sends N streaming
chat requests at once with the official async `openai` client (greedy, ignore_eos, a fixed number of
tokens each) and measures output tokens/s, time to first token and inter-token latency, and the CPU
the client process itself used (on a small machine the clients take cores from the server). The same
prompts and parameters then run through the offline API in this process: the ratio is what the HTTP
layer and the async engine loop keep of the engine's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request

from bench.decode import machine

MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, path: str = "/health", tries: int = 480) -> None:
    """Until the server on 127.0.0.1:port answers `path` (every 0.5 s)."""
    for _ in range(tries):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server on port {port} did not come up")


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me a short story about a lighthouse keeper named number {i}."}]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def run_clients(base_url: str, n: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    ttft, itl, tokens = [], [], 0

    async def one(i: int) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        last = None
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages(i), max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.append(now - last)
                last = now
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens

    t, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu  # the client's own CPU time: taken from the server on this machine
    await client.close()
    return {"tps": tokens / wall, "tokens": tokens, "ttft": ttft, "itl": itl, "client_cpu": cpu / wall}


def offline_tps(n: int, max_tokens: int, llm) -> float:
    from keel import SamplingParams
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.chat([messages(i) for i in range(n)], p)  # warm-up
    t = time.perf_counter()
    outs = llm.chat([messages(i) for i in range(n)], p)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS for the server process")
    ap.add_argument("--skip-offline", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    port = free_port()
    keel = os.path.join(os.path.dirname(sys.executable), "keel")
    env = dict(os.environ)
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    server = subprocess.Popen([keel, "serve", "--port", str(port), "--max-num-seqs", "64"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_up(port)
        base = f"http://127.0.0.1:{port}/v1"
        asyncio.run(run_clients(base, 2, 8))  # warm-up
        served = {n: asyncio.run(run_clients(base, n, args.max_tokens)) for n in counts}
        if args.skip_offline:
            print({n: round(v["tps"], 1) for n, v in served.items()})
            return
    finally:
        server.terminate()
        server.wait(timeout=30)

    from keel import LLM
    llm = LLM()
    offline = {n: offline_tps(n, args.max_tokens, llm) for n in counts}

    rows = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}",
            f"Built-in model, chat requests, greedy, {args.max_tokens} tokens each (ignore_eos), all clients at once", "",
            "| clients | server tok/s | offline tok/s | server / offline | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 "
            "| client CPU (cores) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for n in counts:
        s = served[n]
        rows.append(f"| {n} | {s['tps']:.1f} | {offline[n]:.1f} | {s['tps'] / offline[n]:.2f}x | "
                    f"{pct(s['ttft'], .5) * 1e3:.0f} ms | {pct(s['ttft'], .99) * 1e3:.0f} ms | "
                    f"{pct(s['itl'], .5) * 1e3:.0f} ms | {pct(s['itl'], .99) * 1e3:.0f} ms | {s['client_cpu']:.2f} |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# bench/serve.py\n\n" + text + "\n")


if __name__ == "__main__":
    main()
