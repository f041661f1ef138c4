"""The gateway in front of fake backends: failover before the first byte (connection refused, 5xx, 429,
a backend found down), an explicit error event after it, client errors passed on, aliases mapped to each
backend's own model name, circuit breakers, and names learned from the backends' /models."""

from __future__ import annotations

import socket
import time

import openai
import pytest

from keel.errors import KeelError
from keel.gateway.config import parse
from keel.gateway.proxy import create_gateway_app
from tests.gateway.fake import Fake
from tests.server.conftest import LiveServer

MSG = [{"role": "user", "content": "hi"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fakes():
    a, b = Fake("a"), Fake("b")
    with LiveServer(a.app) as sa, LiveServer(b.app) as sb:
        yield a, b, sa.url + "/v1", sb.url + "/v1"


def gateway(backends: list[dict], **settings):
    cfg = parse({"models": {"chat": {"backends": backends, "timeout_s": 10}}, "health_check_interval_s": 0.2,
                 "backoff_s": 0.01, **settings})
    return LiveServer(create_gateway_app(cfg))


def test_failover_before_the_first_byte_is_invisible(fakes):
    a, b, ua, ub = fakes
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with gateway([{"url": dead, "model": "up-model", "name": "dead"}, {"url": ua, "model": "up-model", "name": "a"},
                  {"url": ub, "model": "up-model", "name": "b", "priority": 1}]) as g:
        c = g.client()
        a.mode = "500"
        for _ in range(4):
            raw = c.chat.completions.with_raw_response.create(model="chat", messages=MSG)
            assert raw.headers["x-keel-backend"] == "b"
            r = raw.parse()
            assert r.choices[0].message.content == "from b" and r.system_fingerprint == "fp-b"
        assert {call["model"] for call in b.calls} == {"up-model"}  # the alias became the backend's name
        a.mode = "429"
        assert c.chat.completions.create(model="chat", messages=MSG).choices[0].message.content == "from b"
        for stream in (False, True):
            a.mode, b.mode = "ok", "ok"
            time.sleep(0.01)
            out = c.chat.completions.create(model="chat", messages=MSG, stream=stream)
            text = out.choices[0].message.content if not stream else "".join(
                ch.choices[0].delta.content or "" for ch in out)
            assert text.strip() in ("from a", "from b")


def test_metrics_count_answers_failovers_and_backend_state(fakes):
    a, b, ua, ub = fakes
    with gateway([{"url": ua, "model": "up-model", "name": "a"},
                  {"url": ub, "model": "up-model", "name": "b", "priority": 1}], circuit_failures=2) as g:
        a.mode = "500"
        c = g.client()
        for stream in (False, False, True):
            out = c.chat.completions.create(model="chat", messages=MSG, stream=stream)
            if stream:
                list(out)
        m = {k: float(v) for k, v in (line.rsplit(" ", 1) for line in g.http().get("/metrics").text.splitlines()
                                      if line and not line.startswith("#"))}
        assert m['keel_gateway_failovers_total{backend="a",model="chat",reason="status 500"}'] == 2
        assert m['keel_gateway_answers_total{backend="b",model="chat",outcome="ok"}'] == 3
        assert m['keel_gateway_backend_circuit_open{backend="a"}'] == 1  # two failures opened it
        assert m['keel_gateway_backend_up{backend="b"}'] == 1 and m['keel_gateway_backend_in_flight{backend="b"}'] == 0


def test_client_errors_are_passed_on_not_retried(fakes):
    a, b, ua, ub = fakes
    with gateway([{"url": ua, "model": "up-model"}, {"url": ub, "model": "up-model", "priority": 1}]) as g:
        a.mode = "400"
        with pytest.raises(openai.BadRequestError, match="a says 400"):
            g.client().chat.completions.create(model="chat", messages=MSG)
        assert not b.calls


def test_a_stream_that_breaks_ends_with_an_error_the_sdk_raises(fakes):
    a, b, ua, ub = fakes
    with gateway([{"url": ua, "model": "up-model"}, {"url": ub, "model": "up-model", "priority": 1}]) as g:
        a.mode = "break"
        got = []
        with pytest.raises(openai.APIError) as e:
            for ch in g.client().chat.completions.create(model="chat", messages=MSG, stream=True):
                got.append(ch.choices[0].delta.content)
        assert got == ["from "]  # what came before is kept, nothing from another backend is spliced in
        assert "failed while streaming" in str(e.value) and not b.calls


def test_a_backend_found_down_is_skipped_and_comes_back(fakes):
    a, b, ua, ub = fakes
    with gateway([{"url": ua, "model": "up-model", "name": "a"},
                  {"url": ub, "model": "up-model", "name": "b", "priority": 1}]) as g:
        c = g.client()
        a.health_ok = False
        time.sleep(0.6)
        assert c.chat.completions.with_raw_response.create(model="chat", messages=MSG).headers["x-keel-backend"] == "b"
        assert not a.calls
        a.health_ok = True
        time.sleep(0.6)
        assert c.chat.completions.with_raw_response.create(model="chat", messages=MSG).headers["x-keel-backend"] == "a"


def test_a_hung_backend_is_failed_over_once_its_health_check_times_out(fakes):
    a, b, ua, ub = fakes
    with gateway([{"url": ua, "model": "up-model", "name": "a"},
                  {"url": ub, "model": "up-model", "name": "b", "priority": 1}], health_check_interval_s=0.5) as g:
        a.mode = "hang"  # requests and health checks alike get no answer
        started = time.monotonic()
        try:
            r = g.client().chat.completions.with_raw_response.create(model="chat", messages=MSG)
            assert r.headers["x-keel-backend"] == "b" and time.monotonic() - started < 5
            assert len(a.calls) == 1  # it was tried first, then given up on when found down
        finally:
            a.mode = "ok"


def test_the_circuit_opens_after_repeated_failures(fakes):
    a, b, ua, ub = fakes
    with gateway([{"url": ua, "model": "up-model"}, {"url": ub, "model": "up-model"}],
                 circuit_failures=2, circuit_cooldown_s=30) as g:
        a.mode = "500"
        c = g.client()
        for _ in range(8):
            assert c.chat.completions.create(model="chat", messages=MSG).choices[0].message.content == "from b"
        assert len(a.calls) == 2  # two failures opened its circuit: no request went there since


def test_names_learned_from_backends_and_unknown_models(fakes):
    a, b, ua, ub = fakes
    b.models.append("tenant-adapter")
    with gateway([{"url": ua, "model": "up-model"}, {"url": ub, "model": "up-model"}]) as g:
        time.sleep(0.5)
        c = g.client()
        assert {"chat", "up-model", "tenant-adapter"} <= {m.id for m in c.models.list()}
        r = c.chat.completions.with_raw_response.create(model="tenant-adapter", messages=MSG)
        assert r.headers["x-keel-backend"] == ub.split("://")[1].split("/")[0]
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="nobody-serves-this", messages=MSG)


def test_bad_and_oversized_bodies_are_refused_and_the_gateway_goes_on(fakes, monkeypatch):
    import keel.gateway.proxy as proxy
    a, b, ua, ub = fakes
    monkeypatch.setattr(proxy, "MAX_BODY_BYTES", 10_000)
    with gateway([{"url": ua, "model": "up-model"}]) as g, g.http() as h:
        for body, status in ((b"{not json", 400), (b'{"messages": []}', 400), (b'["model"]', 400),
                             (b'{"model": 5}', 400), (b'{"model": "chat", "x": "' + b"y" * 20_000 + b'"}', 413)):
            r = h.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status and r.json()["error"]["message"], body[:40]
        r = h.post("/v1/chat/completions", content=(b"x" * 4096 for _ in range(5)))  # chunked, over the limit
        assert r.status_code == 413
        assert not a.calls
        assert g.client().chat.completions.create(model="chat", messages=MSG).choices[0].message.content == "from a"


def test_the_gateway_key_and_openai_shaped_errors(fakes):
    a, b, ua, ub = fakes
    cfg = parse({"models": {"chat": {"backends": [{"url": ua, "model": "up-model"}]}}})
    with LiveServer(create_gateway_app(cfg, api_key="gw-secret")) as g, g.http() as h:
        with pytest.raises(openai.AuthenticationError):
            g.client(api_key="wrong").chat.completions.create(model="chat", messages=MSG)
        assert h.get("/v1/models").status_code == 401
        assert g.client(api_key="gw-secret").chat.completions.create(model="chat", messages=MSG).choices
        for r in (h.get("/v1/nothing-here"), h.get("/v1/chat/completions")):  # unknown route, wrong method
            assert r.status_code in (404, 405) and r.json()["error"]["message"]


def test_all_backends_failing_is_a_503_naming_the_last_error(fakes):
    a, b, ua, ub = fakes
    a.mode = b.mode = "500"
    with gateway([{"url": ua, "model": "up-model"}, {"url": ub, "model": "up-model"}]) as g:
        with pytest.raises(openai.InternalServerError, match="No backend could serve"):
            g.client().chat.completions.create(model="chat", messages=MSG)


@pytest.mark.parametrize("bad, word", [
    ({}, "models"), ({"models": {"x": {"backends": []}}}, "backends"),
    ({"models": {"x": {"backends": [{"url": "nohost"}]}}}, "url"),
    ({"models": {"x": {"backends": [{"url": "http://h/v1", "colour": 1}]}}}, "colour"),
    ({"models": {"x": {"backends": [{"url": "http://h/v1", "api_key_env": "KEEL_SURELY_UNSET"}]}}}, "not set"),
    ({"models": {"x": {"backends": [{"url": "http://h/v1"}], "timeout_s": -1}}}, "timeout_s"),
    ({"models": {"x": {"backends": [{"url": "http://h/v1"}]}}, "retrys": 2}, "retrys"),
])
def test_bad_configs_name_the_field(bad, word):
    with pytest.raises(KeelError, match=word):
        parse(bad)


def test_keel_gateway_command_refuses_bad_files_cleanly(tmp_path, capsys):
    from keel.cli import main
    assert main(["gateway", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    cfg = tmp_path / "g.yaml"
    cfg.write_text("models: [oops\n")
    assert main(["gateway", "--config", str(cfg)]) == 2
    assert "YAML" in capsys.readouterr().err
    cfg.write_text("models:\n  chat:\n    backends: [{url: 'http://127.0.0.1:1/v1'}]\n")
    assert main(["gateway", "--config", str(cfg), "--api-key-file", str(tmp_path / "nokey")]) == 2
    assert "api-key-file" in capsys.readouterr().err
