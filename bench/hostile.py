"""The hostile-input barrage of issue 12 against a real `keel serve`, with /health polled throughout.

    .venv/bin/python -m bench.hostile [--rounds 2] [--baseline-rev REV] [--out bench/results/hostile.md]

Starts `keel serve` on the built-in model (with the built-in embedding model and LoRA loading from
one allowed folder), polls GET /health every 20 ms from a thread, and measures:
- /health latency while the server is idle (the baseline, same run), then during the barrage;
- the barrage: every case of the issue (huge top_k, lone surrogates, deep nesting, malformed tool
  calls, 5 MB prompts, a 40 MB body, 3,000 embedding inputs, slowloris connections, bad adapter
  names, paths and configs), `--rounds` times, each followed by a real chat request;
- how many answers were 5xx, whether /health ever said 503, and the server's RSS before the barrage
  and after it (after the same warm-up), as a ratio.
With --baseline-rev, the same barrage also runs against keel at that git revision (checked out in a
temporary worktree), for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from bench.decode import machine
from bench.serve import free_port, pct

MODEL = "SmolLM2-135M-Instruct"
EMB = "all-MiniLM-L6-v2"


def chat(content="Say hi.", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


def cases(adapter_dir: str) -> list[tuple[str, str, bytes]]:
    """(label, path, raw body) for every case; bodies are written as text so that lone surrogates
    travel as JSON escapes and deep nesting needs no recursion to build."""
    d = json.dumps
    deep_schema = '{"type": "object", "properties": {"a": ' * 1000 + '{"type": "string"}' + "}}" * 1000
    out = [
        ("top_k 1e30", "/v1/chat/completions", d(chat(top_k=10**30, temperature=0.8))),
        ("top_k 2^63", "/v1/chat/completions", d(chat(top_k=2**63, temperature=0.8))),
        ("seed 2^64", "/v1/chat/completions", d(chat(seed=2**64))),
        ("surrogate chat", "/v1/chat/completions", d(chat("\ud800"))),
        ("surrogate prompt", "/v1/completions", d({"model": MODEL, "prompt": "\ud800"})),
        ("surrogate input", "/v1/embeddings", d({"model": EMB, "input": "\ud800"})),
        ("surrogate model", "/v1/chat/completions", d(chat(model="x\ud800"))),
        ("surrogate lora_path", "/v1/load_lora_adapter", d({"lora_name": "a", "lora_path": "\ud800"})),
        ("surrogate lora_name", "/v1/load_lora_adapter", d({"lora_name": "bad\udc80", "lora_path": adapter_dir})),
        ("10k brackets", "/v1/chat/completions", "[" * 10_000 + "]" * 10_000),
        ("schema 1000 deep", "/v1/chat/completions",
         d(chat(response_format="@@")).replace('"@@"', '{"type": "json_schema", "json_schema": {"name": "x", "schema": '
                                                + deep_schema + "}}")),
        ("tool_calls str", "/v1/chat/completions",
         d(chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": "str"}]}]))),
        ("NaN", "/v1/chat/completions", d(chat()).replace('"max_tokens": 8', '"temperature": NaN')),
        ("5 MB chat", "/v1/chat/completions", d(chat("word " * (5 * 2**20 // 5)))),
        ("5 MB prompt", "/v1/completions", d({"model": MODEL, "prompt": "word " * (5 * 2**20 // 5)})),
        ("5 MB model name", "/v1/chat/completions", d(chat(model="m" * 5 * 2**20))),
        ("40 MB body", "/v1/chat/completions", d(chat("x" * 40 * 2**20))),
        ("3000 embedding inputs", "/v1/embeddings", d({"model": EMB, "input": ["a sentence to embed"] * 3000})),
        ("1 MB adapter name", "/v1/load_lora_adapter", d({"lora_name": "n" * 2**20, "lora_path": adapter_dir})),
        ("adapter name ../", "/v1/load_lora_adapter", d({"lora_name": "../x", "lora_path": adapter_dir})),
        ("adapter name = model", "/v1/load_lora_adapter", d({"lora_name": MODEL, "lora_path": adapter_dir})),
        ("adapter path /etc", "/v1/load_lora_adapter", d({"lora_name": "etc", "lora_path": "/etc"})),
        # last: under a backtracking regex engine it holds the GIL for minutes (the issue saw 487 s)
        ("adapter regex (.|.)*X", "/v1/load_lora_adapter",
         d({"lora_name": "regex", "lora_path": os.path.join(adapter_dir, "regex")})),
    ]
    return [(label, path, body.encode("utf-8", "surrogatepass")) for label, path, body in out]


def regex_adapter(folder: str) -> None:
    """An adapter folder whose config's target_modules is catastrophic for a backtracking regex."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "(.|.)*X"}, f)
    open(os.path.join(folder, "adapter_model.safetensors"), "wb").close()


class Poller(threading.Thread):
    """GET /health every 20 ms; keeps (time, latency, status)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.samples, self.stop = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as h:
            while not self.stop.is_set():
                t = time.perf_counter()
                try:
                    status = h.get(self.url + "/health").status_code
                except httpx.HTTPError:
                    status = 0
                self.samples.append((t, time.perf_counter() - t, status))
                time.sleep(0.02)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def slowloris(port: int, n: int = 50) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    return socks


def open_after(socks: list[socket.socket], wait: float) -> int:
    """How many slowloris connections the server still held open after `wait` seconds."""
    time.sleep(wait)
    still = 0
    for s in socks:
        s.settimeout(0.1)
        try:
            still += s.recv(1) != b""
        except socket.timeout:
            still += 1
        except OSError:
            pass
        s.close()
    return still


REQUEST_TIMEOUT_S = 60  # an answer that takes longer is recorded as ReadTimeout


def run_barrage(keel_cmd: list[str], env: dict, rounds: int, tmp: str) -> dict:
    port = free_port()
    adapters = os.path.join(tmp, "adapters")
    regex_adapter(os.path.join(adapters, "regex"))
    args = [*keel_cmd, "serve", "--port", str(port), "--enable-lora"]
    if "--allowed-lora-path" in subprocess.run([*keel_cmd, "serve", "--help"], capture_output=True, text=True,
                                               env=env).stdout:
        args += ["--allowed-lora-path", adapters]
    log = open(os.path.join(tmp, f"server-{port}.log"), "w")
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    out = {"statuses": {}, "5xx": 0, "deaths": 0}
    try:
        for _ in range(480):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        h = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S)
        for _ in range(3):  # warm-up: the same work a round ends with
            h.post("/v1/chat/completions", json=chat())
            h.post("/v1/embeddings", json={"model": EMB, "input": ["warm"] * 8})
        poller = Poller(url)
        poller.start()
        time.sleep(3)
        idle_end = time.perf_counter()
        rss_before = rss_mb(server.pid)
        for r in range(rounds):
            socks = slowloris(port)
            for label, path, body in cases(adapters):
                try:
                    resp = h.post(path, content=body, headers={"content-type": "application/json"})
                    status = resp.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                out["statuses"].setdefault(label, []).append(status)
                out["5xx"] += isinstance(status, int) and status >= 500
            out.setdefault("slowloris_open", []).append(open_after(socks, 12))
            try:
                ok = h.post("/v1/chat/completions", json=chat()).status_code
            except httpx.HTTPError as e:
                ok = type(e).__name__
            out["statuses"].setdefault("normal chat after the round", []).append(ok)
        time.sleep(2)
        poller.stop.set()
        poller.join()
        try:
            for _ in range(3):
                h.post("/v1/chat/completions", json=chat())
                h.post("/v1/embeddings", json={"model": EMB, "input": ["warm"] * 8})
        except httpx.HTTPError:
            pass
        time.sleep(1)
        out["rss_before"], out["rss_after"] = rss_before, rss_mb(server.pid)
        idle = [lat for t, lat, _ in poller.samples if t < idle_end]
        busy = [lat for t, lat, _ in poller.samples if t >= idle_end]
        out["deaths"] = sum(st == 503 for _, _, st in poller.samples)
        out["health_failures"] = sum(st != 200 for _, _, st in poller.samples)
        out["idle"], out["busy"] = idle, busy
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return out


def report(name: str, r: dict) -> list[str]:
    idle50, busy50, busy99 = pct(r["idle"], .5), pct(r["busy"], .5), pct(r["busy"], .99)
    busymax = max(r["busy"], default=float("nan"))
    rows = [f"### {name}", "",
            f"- /health: idle p50 {idle50 * 1e3:.1f} ms; during the barrage p50 {busy50 * 1e3:.1f} ms "
            f"({busy50 / idle50:.1f}x idle), p99 {busy99 * 1e3:.1f} ms, max {busymax * 1e3:.0f} ms "
            f"over {len(r['busy'])} polls; answers other than 200: {r['health_failures']} (503: {r['deaths']})",
            f"- 5xx answers to barrage requests: {r['5xx']}",
            f"- slowloris connections still open 12 s after their half head, per round: {r.get('slowloris_open')}",
            f"- server RSS: {r['rss_before']:.0f} MB before, {r['rss_after']:.0f} MB after "
            f"({r['rss_after'] / r['rss_before']:.3f}x)", "",
            "| case | status per round |", "|---|---|"]
    rows += [f"| {label} | {', '.join(map(str, st))} |" for label, st in r["statuses"].items()]
    return rows + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline-rev", default=None, help="also run the barrage against keel at this git revision")
    ap.add_argument("--baseline-rounds", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="keel-hostile-")
    keel = [os.path.join(os.path.dirname(sys.executable), "keel")]
    results = [("this revision", run_barrage(keel, dict(os.environ), args.rounds, tmp))]
    if args.baseline_rev:
        tree = os.path.join(tmp, "baseline")
        subprocess.run(["git", "worktree", "add", "--detach", tree, args.baseline_rev], check=True,
                       capture_output=True)
        try:
            # the editable install's import hook would find this checkout's keel first: drop it
            start = (f"import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
                     f"getattr(f, '__module__', '')]; sys.path.insert(0, {tree!r}); import keel; "
                     f"assert keel.__file__.startswith({tree!r}), keel.__file__; "
                     f"from keel.cli import main; sys.exit(main())")
            results.append((f"baseline {args.baseline_rev}",
                            run_barrage([sys.executable, "-c", start], dict(os.environ), args.baseline_rounds, tmp)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], capture_output=True)
    rows = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}",
            f"Built-in model and embedding model, `keel serve` defaults; {args.rounds} rounds of the barrage, "
            f"(baseline: {args.baseline_rounds}), /health polled every 20 ms from another thread of the benchmark "
            f"process, {REQUEST_TIMEOUT_S} s client timeout per request", ""]
    for name, r in results:
        rows += report(name, r)
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# bench/hostile.py\n\n" + text + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
