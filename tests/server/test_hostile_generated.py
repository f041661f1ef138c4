"""Generated hostile requests (hypothesis): valid bodies with fields replaced by arbitrary JSON (huge
numbers, lone surrogates, wrong types at any depth, unknown fields), and arbitrary JSON as a whole
body, sent to every POST route. Every answer must be a 200 or a 4xx in OpenAI's shape, never a 5xx,
and the server must be whole afterwards. Derandomized and bounded so the suite stays fast."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL
from tests.server.hostile import EMB, check_4xx, check_whole, hostile_server

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") skips this module

ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "t1 " * 300, "", " ", "t999", "<|im_end|>",
                            "\U0001f600", "\\", '"', "NaN"])
NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64]),
                    st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False), st.sampled_from([1e308, -1e308, 5e-324]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20), ODD_TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8) | ODD_TEXT, inner, max_size=4)),
                      max_leaves=12)

# values a field could well have, so that some mutated bodies stay valid and get served
PLAUSIBLE = st.one_of(st.none(), st.booleans(), st.integers(0, 8), st.floats(0, 1, allow_subnormal=False),
                      st.sampled_from(["t5 t6", "auto", "none", "float", "base64", ["t5", "t6"], [5, 6], {}]))
EDIT = st.one_of(PLAUSIBLE, VALUES)

BASES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "t10 t11"}], "max_tokens": 4},
    "/v1/completions": {"model": MODEL, "prompt": "t10 t11", "max_tokens": 4},
    "/v1/embeddings": {"model": EMB, "input": "some text"},
    "/v1/responses": {"model": MODEL, "input": "t10 t11", "max_output_tokens": 4},
    "/v1/load_lora_adapter": {"lora_name": "gen", "lora_path": "nowhere"},
    "/v1/unload_lora_adapter": {"lora_name": "gen"},
}
SAMPLING = ["model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logit_bias", "stream",
            "stream_options", "min_p", "repetition_penalty", "stop_token_ids", "min_tokens", "unknown_field"]
FIELDS = {
    "/v1/chat/completions": SAMPLING + ["messages", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice"],
    "/v1/completions": SAMPLING + ["prompt", "echo", "logprobs"],
    "/v1/embeddings": ["model", "input", "dimensions", "encoding_format", "truncation", "user", "unknown_field"],
    "/v1/responses": ["model", "input", "instructions", "tools", "tool_choice", "text", "max_output_tokens",
                      "temperature", "top_p", "stream", "store", "previous_response_id", "top_logprobs",
                      "unknown_field"],
    "/v1/load_lora_adapter": ["lora_name", "lora_path", "load_inplace", "unknown_field"],
    "/v1/unload_lora_adapter": ["lora_name", "lora_int_id", "unknown_field"],
}
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id"]


@pytest.fixture(scope="module")
def srv(tiny_ckpt, tmp_path_factory):
    with hostile_server(tiny_ckpt, tmp_path_factory.mktemp("generated")) as s:
        yield s


def mutated(route: str):
    base = BASES[route]
    field_edits = st.dictionaries(st.sampled_from(FIELDS[route]), EDIT, max_size=3)
    message_edits = st.dictionaries(st.sampled_from(MESSAGE_FIELDS), EDIT, max_size=2)

    def apply(edits, msg_edits, whole, use_whole):
        if use_whole:
            return whole
        body = {**base, **edits}
        if route == "/v1/chat/completions" and msg_edits and "messages" not in edits:
            body["messages"] = [{**base["messages"][0], **msg_edits}]
        return body
    one_in_ten = st.integers(0, 9).map(lambda i: i == 0)  # now and then a whole body of arbitrary JSON
    return st.builds(apply, field_edits, message_edits, VALUES, one_in_ten)


def check_answer(r, route: str) -> None:
    assert r.status_code < 500, (route, r.status_code, r.text[:500])
    if r.status_code >= 400:
        check_4xx(r)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        if route == "/v1/responses":  # typed events, no [DONE]: the last says how it ended
            assert r.text.rstrip().splitlines()[-2] in ("event: response.completed", "event: response.incomplete")
        else:
            assert r.text.endswith("data: [DONE]\n\n")
    elif "json" in r.headers.get("content-type", ""):
        r.json()


@pytest.mark.parametrize("route", list(BASES))
def test_generated_requests_never_give_a_5xx(srv, route):
    seen = {"count": 0, "ok": 0, "4xx": 0}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=mutated(route))
    def run(body):
        seen["count"] += 1
        with srv.http() as h:
            text = json.dumps(body)  # lone surrogates travel as \ud800 escapes
            r = h.post(route, content=text.encode(), headers={"content-type": "application/json"})
            check_answer(r, route)
            seen["ok" if r.status_code < 400 else "4xx"] += 1
            assert h.get("/health").status_code == 200
    run()
    assert seen["count"] >= 60 and seen["4xx"] > 0, seen
    if "lora" not in route:  # the mutations leave some bodies valid: those must be served
        assert seen["ok"] > 0, seen
    assert srv.state.client.dead is None
    check_whole(srv)
    srv.wait_idle()
