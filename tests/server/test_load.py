"""Many clients at once: batching, clients that leave mid-request, and the 429 back-pressure."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from keel.engine.async_engine import AsyncEngine
from keel.sampling_params import SamplingParams
from keel.server import create_app
from keel.server.streaming import Fanin
from tests.server.conftest import MODEL, LiveServer, chat_body, tiny_engine


def test_sixteen_concurrent_streams_are_batched(server, client):
    prompts = [f"t{10 + k} t{40 + 3 * k} t{100 + k}" for k in range(16)]
    kw = dict(model=MODEL, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    # each prompt alone first: greedy tokens must not depend on what else is in the batch
    expected = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    server.wait_idle()
    server.state.client.max_running_seen = 0

    async def one(aclient, prompt: str) -> tuple[str, str | None]:
        text, reason = "", None
        async for chunk in await aclient.completions.create(prompt=prompt, stream=True, **kw):
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
        return text, reason

    async def main():
        async with server.async_client() as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    results = asyncio.run(main())
    assert [t for t, _ in results] == expected
    assert all(r == "length" for _, r in results)
    m = server.wait_idle()
    assert m["keel_requests_running_max"] > 1, "the engine never ran two requests in one step"


def slow_steps(server, monkeypatch) -> None:
    """Each engine step takes at least 5 ms, so a long generation outlasts a client that leaves early
    whatever the machine (the tiny model alone decodes 250 tokens in about 0.3 s)."""
    engine = server.state.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.005) or step())


def test_client_disconnect_frees_the_kv_cache(server, monkeypatch):
    slow_steps(server, monkeypatch)
    before = server.wait_idle()
    with server.http() as http:
        body = chat_body(max_tokens=200, stream=True, ignore_eos=True)
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = []
            for line in lines:
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                if len(got) == 4:
                    break
            assert server.metrics()["keel_kv_cache_usage_ratio"] > 0  # still generating
        # leaving the block closed the connection after four chunks of two hundred
    after = server.wait_idle()
    assert after['keel_requests_total{finish_reason="abort"}'] == before['keel_requests_total{finish_reason="abort"}'] + 1
    assert after["keel_generation_tokens_total"] - before["keel_generation_tokens_total"] < 200
    pool = server.state.engine.pool
    assert pool.num_free == pool.num_blocks


def test_non_streamed_client_that_gives_up_is_aborted(server, monkeypatch):
    slow_steps(server, monkeypatch)
    before = server.wait_idle()
    with server.http(timeout=0.3) as http:
        try:
            http.post("/v1/completions", json={"model": MODEL, "prompt": "t3", "max_tokens": 250, "ignore_eos": True})
            raise AssertionError("250 tokens should take longer than the client's 0.3 s timeout")
        except httpx.ReadTimeout:
            pass
    after = server.wait_idle()
    assert after['keel_requests_total{finish_reason="abort"}'] == before['keel_requests_total{finish_reason="abort"}'] + 1


def test_queue_full_is_429_with_retry_after(tiny_ckpt, schemas):
    # one running slot and one waiting slot: of six simultaneous requests, some must be turned away
    app = create_app(tiny_engine(tiny_ckpt, max_num_seqs=1), served_model_name=MODEL, max_waiting=1)
    with LiveServer(app) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                body = chat_body(max_tokens=48, ignore_eos=True)
                return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(6)))
        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                schemas.validate("ErrorResponse", r.json())
                assert r.json()["error"]["type"] == "rate_limit_error"
        with s.http() as http:
            assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200
        s.wait_idle()


def test_cancel_while_the_engine_takes_the_request(tiny_ckpt):
    """A client can leave while its request is being handed to the engine thread; that must neither
    leak the request nor stop the engine (AsyncEngine alone does both, see streaming._first)."""
    engine = tiny_engine(tiny_ckpt)
    aeng = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def main():
        busy = Fanin([aeng.generate("busy", [5, 6, 7], params)])  # keeps the engine thread stepping
        await busy.start()
        for k in range(20):
            victim = Fanin([aeng.generate(f"victim-{k}", [5, 6, 8 + k], params)])
            for _ in range(k % 4):  # cancel at different points of the hand-over
                await asyncio.sleep(0)
            await victim.aclose()
        await busy.aclose()
        # Stay on this event loop until the engine has processed the aborts: it may still send
        # outputs to it until then, and fails if the loop is closed (see the report on AsyncEngine).
        deadline = time.monotonic() + 10
        while engine.has_unfinished_requests() and aeng.dead is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert aeng.dead is None
        assert not engine.has_unfinished_requests() and engine.pool.num_free == engine.pool.num_blocks
    finally:
        aeng.shutdown()


def test_engine_thread_sets_its_thread_count(tiny_ckpt):
    """keel serve loads the model with one torch thread (no OpenMP pool on the main thread) and the
    engine thread restores the machine's count before its first step (see keel.serve_cli._serve)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = tiny_engine(tiny_ckpt)
        seen, step = set(), engine.step

        def counting_step():
            seen.add(torch.get_num_threads())
            return step()
        engine.step = counting_step
        aeng = AsyncEngine(engine, num_threads=2)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

        async def main():
            out = None
            async for out in aeng.generate("r", [5, 6, 7], params):
                pass
            return out
        out = asyncio.run(main())
        assert len(out.outputs[0].token_ids) == 4
        # OpenMP's thread count is per thread: the engine thread steps with 2, the main thread keeps 1
        assert seen == {2} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
