"""The engine loop survives anything one request or one step does: the failing request gets a 500 with
an error id, the others in its batch finish with the tokens they would have had alone, KV blocks are
freed, /health stays 200 and the loop keeps serving. Failures are injected where the code could fail
on its own: a request's sampling settings, its detokenizer, a whole model step, the loop itself."""

from __future__ import annotations

import asyncio
import json

import pytest

from keel.engine.detokenizer import IncrementalDetokenizer
from keel.engine.sampler import Sampler
from keel.server import create_app
from tests.server.conftest import MODEL, LiveServer, chat_body, sse_events, tiny_engine

POISON_SEED = 666


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    with LiveServer(create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL)) as s:
        yield s


def body(seed: int, **kw) -> dict:
    return chat_body(f"t{10 + seed % 50} t11 t12", temperature=0.9, seed=seed, max_tokens=12, **kw)


def alone(srv, seeds) -> dict[int, str]:
    with srv.http() as h:
        return {s: h.post("/v1/chat/completions", json=body(s)).json()["choices"][0]["message"]["content"]
                for s in seeds}


async def together(srv, bodies: list[dict]):
    import httpx
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as h:
        return await asyncio.gather(*(h.post("/v1/chat/completions", json=b) for b in bodies))


def check_500(r) -> None:
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "internal_error" and "error id" in err["message"] and "Traceback" not in r.text


def check_healthy(srv) -> None:
    with srv.http() as h:
        assert h.get("/health").status_code == 200
        assert h.post("/v1/chat/completions", json=chat_body()).status_code == 200
    assert srv.state.client.dead is None
    srv.wait_idle()


def test_a_request_whose_sampling_fails_ends_alone(srv, monkeypatch):
    seeds = [1, 2, 3, 4]
    expected = alone(srv, seeds)
    adjust = Sampler._adjust_row

    def poisoned(row, r):
        if r.params.seed == POISON_SEED:
            raise OverflowError("injected: this request's settings cannot be applied")
        return adjust(row, r)
    monkeypatch.setattr(Sampler, "_adjust_row", staticmethod(poisoned))
    rs = asyncio.run(together(srv, [body(s) for s in seeds] + [body(POISON_SEED)]))
    check_500(rs[-1])
    for s, r in zip(seeds, rs):
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[s]
    check_healthy(srv)


def test_a_request_whose_detokenizer_fails_ends_alone(srv, monkeypatch):
    seeds = [5, 6, 7]
    expected = alone(srv, seeds)
    update = IncrementalDetokenizer.update

    def broken(self, ids):
        if getattr(self, "poisoned", False):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return update(self, ids)
    monkeypatch.setattr(IncrementalDetokenizer, "update", broken)
    init = IncrementalDetokenizer.__init__

    def mark(self, tokenizer, prompt_ids, **kw):
        init(self, tokenizer, prompt_ids, **kw)
        self.poisoned = srv.state.engine.tokenizer.token_to_id("t98") in prompt_ids
    monkeypatch.setattr(IncrementalDetokenizer, "__init__", mark)
    rs = asyncio.run(together(srv, [body(s) for s in seeds] + [chat_body("t98 t99", max_tokens=8)]))
    check_500(rs[-1])
    for s, r in zip(seeds, rs):
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[s]
    check_healthy(srv)


def test_a_failed_step_ends_its_requests_and_the_next_are_served(srv, monkeypatch):
    runner = srv.state.engine.runner
    execute = runner.execute
    state = {"left": 1}

    def fails_once(sched):
        if sched.num_scheduled_tokens and state["left"]:
            state["left"] -= 1
            raise RuntimeError("injected: the model step failed")
        return execute(sched)
    monkeypatch.setattr(runner, "execute", fails_once)
    with srv.http() as h:
        check_500(h.post("/v1/chat/completions", json=chat_body()))
    assert srv.state.client.num_restarts == 0  # handled inside the step, not by restarting the loop
    check_healthy(srv)


def test_a_failure_that_escapes_a_step_restarts_the_loop(srv, monkeypatch):
    engine = srv.state.engine
    step = engine.step
    state = {"left": 1}

    def fails_once():
        if state["left"]:
            state["left"] -= 1
            raise RuntimeError("injected: the engine failed outside any request")
        return step()
    monkeypatch.setattr(engine, "step", fails_once)
    before = srv.state.client.num_restarts
    with srv.http() as h:
        check_500(h.post("/v1/chat/completions", json=chat_body()))
        assert srv.state.client.num_restarts == before + 1
        assert srv.metrics()["keel_engine_loop_restarts_total"] == before + 1
    check_healthy(srv)


def test_a_failure_mid_stream_is_an_error_event(srv, monkeypatch):
    adjust = Sampler._adjust_row

    def later(row, r):
        if r.params.seed == POISON_SEED and len(r.output_token_ids) >= 3:
            raise ValueError("injected after three tokens")
        return adjust(row, r)
    monkeypatch.setattr(Sampler, "_adjust_row", staticmethod(later))
    with srv.http() as h:
        r = h.post("/v1/chat/completions", json=body(POISON_SEED, stream=True, ignore_eos=True))
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal_error" and "error id" in error["message"]
    assert any("choices" in json.loads(e) for e in events[:-2])  # it had started
    check_healthy(srv)
