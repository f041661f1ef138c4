"""Every error comes back in OpenAI's shape with the right status, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import keel.server.chat
from keel.server import create_app
from tests.server.conftest import MODEL, LiveServer, chat_body, sse_events, tiny_engine


def check_error(r: httpx.Response, schemas, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    schemas.validate("ErrorResponse", body)
    err = body["error"]
    assert err["code"] == code and isinstance(err["type"], str) and err["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param
    return err


def still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("content, status, code, param", [
    ('{"model": "tiny-llama", "messages": [', 400, "invalid_json", None),
    (json.dumps(chat_body(temprature=0.5)), 400, "unknown_parameter", "temprature"),
    (json.dumps(chat_body(temperature=7)), 400, "invalid_value", "temperature"),
    (json.dumps(chat_body(top_p=0)), 400, "invalid_value", "top_p"),
    (json.dumps(chat_body(logit_bias={"x": 1})), 400, "invalid_value", "logit_bias"),
    (json.dumps(chat_body(stop=["a", "b", "c", "d", "e"])), 400, "invalid_value", "stop"),
    (json.dumps(chat_body(top_logprobs=2)), 400, "invalid_value", "top_logprobs"),
    (json.dumps(chat_body(messages=[{"role": "robot", "content": "t1"}])), 400, "invalid_value", "messages[0].role"),
    (json.dumps(chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])),
     400, "invalid_value", "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": "t1"}]}), 400, "missing_required_parameter", "model"),
    (json.dumps(chat_body(tools=[{"type": "function", "function": {"name": "f"}}],
                          tool_choice={"type": "function", "function": {"name": "g"}})), 400, "invalid_value", "tool_choice"),
    (json.dumps(chat_body(functions=[{"name": "f"}])), 400, "unsupported_parameter", "functions"),
    (json.dumps(chat_body(response_format={"type": "json_schema"})), 400, "invalid_value", "response_format.json_schema"),
    (json.dumps(chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}})),
     400, "invalid_json_schema", "response_format"),
    (json.dumps(chat_body(max_tokens=250, messages=[{"role": "user", "content": " ".join(["t9"] * 20)}])),
     400, "context_length_exceeded", "messages"),
    (json.dumps(chat_body(model="gpt-4o")), 404, "model_not_found", "model"),
    ("[1, 2]", 400, "invalid_body", None),
])
def test_bad_chat_requests(server, schemas, content, status, code, param):
    with server.http() as http:
        r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        err = check_error(r, schemas, status, code, param)
        if code == "context_length_exceeded":
            limit = server.state.engine.max_model_len
            assert f"maximum context length is {limit} tokens" in err["message"]
            assert "in the messages, 250 in the completion" in err["message"]
        still_serving(http)


@pytest.mark.parametrize("body, code, param", [
    ({"prompt": "t1", "suffix": "t2"}, "unsupported_parameter", "suffix"),
    ({"prompt": "t1", "best_of": 3}, "unsupported_parameter", "best_of"),
    ({"prompt": "t1", "echo": True, "logprobs": 1}, "unsupported_parameter", "echo"),
    ({"prompt": [[]]}, "invalid_value", "prompt"),
    ({"prompt": [{"text": "t1"}]}, "invalid_value", "prompt"),
    ({"prompt": [999999]}, "invalid_value", None),  # the engine's own check: outside the vocabulary
    ({"prompt": "t1 " * 250, "max_tokens": 16}, "context_length_exceeded", "prompt"),
    ({"prompt": "t1", "stream_options": {"include_usage": True}}, "invalid_value", "stream_options"),
])
def test_bad_completion_requests(server, schemas, body, code, param):
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, **body})
        check_error(r, schemas, 400, code, param)
        still_serving(http)


def test_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t1"}], temperature=-1)
    assert e.value.code == "invalid_value" and e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "t1"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="t1 " * 250, max_tokens=10)
    assert e.value.code == "context_length_exceeded"
    # accepted and ignored: hosted-only fields
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t1"}], max_tokens=2,
                                       store=True, metadata={"a": "b"}, user="u1", service_tier="auto",
                                       parallel_tool_calls=False, reasoning_effort="low", prompt_cache_key="k")
    assert r.choices[0].message.content is not None


def test_api_key(tiny_ckpt, schemas, monkeypatch):
    app = create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, api_key="sekret")
    with LiveServer(app) as s, s.http() as http:
        check_error(http.post("/v1/chat/completions", json=chat_body()), schemas, 401, "invalid_api_key")
        r = http.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer wrong"})
        check_error(r, schemas, 401, "invalid_api_key")
        check_error(http.get("/v1/models"), schemas, 401, "invalid_api_key")
        assert http.get("/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = s.client(api_key="sekret").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "t1"}], max_tokens=3)
        assert r.choices[0].message.content is not None


def test_internal_error_is_500_without_traceback(server, schemas, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(keel.server.chat, "render_prompt", boom)
    with server.http() as http:
        err = check_error(http.post("/v1/chat/completions", json=chat_body()), schemas, 500, "internal_error")
        assert err["type"] == "server_error" and "secret" not in err["message"]
        monkeypatch.undo()
        still_serving(http)


def test_error_in_the_middle_of_a_stream(server, monkeypatch):
    calls = []

    def boom(o, include_stop):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("secret internals")
        return o.logprobs or []
    monkeypatch.setattr(keel.server.chat, "visible_logprobs", boom)
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(stream=True, logprobs=True, max_tokens=10))
        assert r.status_code == 200  # the error came after the headers
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "internal_error"
        assert "secret" not in r.text and "Traceback" not in r.text
        monkeypatch.undo()
        server.wait_idle()
        still_serving(http)
    with pytest.raises(openai.APIError):
        monkeypatch.setattr(keel.server.chat, "visible_logprobs", boom)
        list(server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t1"}],
                                                     stream=True, logprobs=True, max_tokens=10))
