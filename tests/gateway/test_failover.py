"""Failover on loopback with real keel servers: two `keel serve` processes behind one alias, 32 clients
streaming at once; one backend is killed with SIGKILL (then stopped with SIGSTOP, a hang) mid-run. No
request that had not received a first byte fails; those cut mid-stream get the documented error; and
traffic is back on the restarted backend within the health-check interval."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from keel.gateway.config import parse
from keel.gateway.proxy import create_gateway_app
from tests.gateway.test_gateway import free_port
from tests.server.conftest import LiveServer, tiny_ckpt  # noqa: F401  (the fixture: a tiny chat model)

pytestmark = pytest.mark.slow
INTERVAL = 0.5
MSG = [{"role": "user", "content": "t5 t6 t7 t8"}]


class Backend:
    def __init__(self, ckpt: str, logs, port: int | None = None) -> None:
        self.ckpt, self.logs, self.port = ckpt, logs, port or free_port()
        self.start()

    def start(self) -> None:
        log = open(self.logs / f"backend-{self.port}.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keel.cli", "serve", self.ckpt, "--port", str(self.port), "--dtype", "float32",
             "--no-embedding-model", "--no-fine-tuning", "--state-db", ":memory:", "--served-model-name", "tiny",
             "--log-level", "WARNING"], stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.kill()
        raise AssertionError((self.logs / f"backend-{self.port}.log").read_text()[-2000:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def backends(tiny_ckpt, tmp_path_factory):  # noqa: F811
    logs = tmp_path_factory.mktemp("gateway_logs")
    a, b = Backend(tiny_ckpt, logs), Backend(tiny_ckpt, logs)
    yield a, b
    a.stop()
    b.stop()


async def one(client: openai.AsyncOpenAI, streaming_on: dict) -> tuple[str, float]:
    """("ok" | "mid-stream" | "failed: ...", when it was sent). streaming_on: backend -> streams that are
    past their first chunks there now."""
    got, sent, backend = 0, time.monotonic(), None
    try:
        async with client.chat.completions.with_streaming_response.create(
                model="chat", messages=MSG, max_tokens=96, stream=True, temperature=0,
                extra_body={"ignore_eos": True}) as resp:
            backend = resp.headers["x-keel-backend"]
            async for ch in await resp.parse():
                if ch.choices and ch.choices[0].delta.content:
                    got += 1
                    if got == 3:
                        streaming_on[backend] = streaming_on.get(backend, 0) + 1
        return ("ok" if got == 96 else f"failed: {got} tokens"), sent
    except openai.APIError as e:
        if got and "failed while streaming" in str(e):
            return "mid-stream", sent
        return f"failed: {type(e).__name__} {e}", sent
    finally:
        if got >= 3:
            streaming_on[backend] -= 1


async def barrage(url: str, n: int, act, run_s: float):
    """n clients sending streaming requests back to back for run_s seconds; act() once backend a has
    streams well under way. Returns the outcomes and when act() ran."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    end = time.monotonic() + run_s
    streaming_on: dict[str, int] = {}

    async def loop():
        out = []
        while time.monotonic() < end:
            out.append(await one(client, streaming_on))
        return out
    tasks = [asyncio.create_task(loop()) for _ in range(n)]
    while streaming_on.get("a", 0) < 4 and time.monotonic() < end - 3:
        await asyncio.sleep(0.02)
    act()
    acted = time.monotonic()
    results = [r for rs in await asyncio.gather(*tasks) for r in rs]
    await client.close()
    return results, acted


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_backend_lost_mid_run(backends, how):
    a, b = backends
    cfg = parse({"models": {"chat": {"backends": [{"url": a.url, "model": "tiny", "name": "a"},
                                                  {"url": b.url, "model": "tiny", "name": "b"}]}},
                 "health_check_interval_s": INTERVAL, "backoff_s": 0.02, "retries": 4})
    with LiveServer(create_gateway_app(cfg)) as g:
        lose = (lambda: a.proc.kill()) if how == "kill" else (lambda: os.kill(a.proc.pid, signal.SIGSTOP))
        results, lost_at = asyncio.run(barrage(g.url, 32, lose, run_s=7.0))
        failed = [r for r, _ in results if r.startswith("failed")]
        assert not failed, failed  # no request that had not started streaming was lost
        after = [r for r, sent in results if sent > lost_at]
        mid = sum(r == "mid-stream" for r, _ in results)
        # a's streams were cut and said so; the requests sent after the loss (the first ones before any
        # health check could notice) were all answered in full by b
        assert 4 <= mid <= 32 and len(after) >= 16 and set(after) == {"ok"}, (mid, len(after))
        # bring a back, then traffic reaches it again within the health-check interval
        if how == "kill":
            a.proc.wait(10)
            a.start()
        else:
            os.kill(a.proc.pid, signal.SIGCONT)
        back = time.monotonic()
        c = g.client()
        seen = set()
        while "a" not in seen and time.monotonic() - back < 10:
            r = c.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=2)
            seen.add(r.headers["x-keel-backend"])
            time.sleep(0.05)
        assert "a" in seen
        assert time.monotonic() - back < 3 * INTERVAL + 2  # a health check or two, plus the request
