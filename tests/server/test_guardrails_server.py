"""Guardrail policies on a server, through the openai client: a blocked prompt is a 400
content_policy_violation naming the rule, redacted answers (streamed or not) never show what was
redacted, a blocked stream ends with an error before the span, flags are counted, and the policy's
version is part of system_fingerprint. The tiny model's vocabulary is tokens named t0..t255 (the rules see the prompt as the model does: its
tokens, decoded)."""

from __future__ import annotations

import re

import openai
import pytest

from keel.gateway.guardrails import parse
from keel.server import create_app
from tests.server.conftest import MODEL, LiveServer, tiny_engine

MSG = [{"role": "user", "content": "t5 t6 t7"}]
POLICY = {"policies": [
    {"name": "redacting", "models": [MODEL],
     "input": [{"name": "no-secrets", "type": "deny", "patterns": ["t77\\b"], "action": "block"},
               {"name": "t9-in", "type": "regex", "patterns": ["t9"], "action": "flag"}],
     "output": [{"name": "tens", "type": "regex", "patterns": ["t1[0-9]\\b"], "action": "redact"},
                {"name": "t2x", "type": "regex", "patterns": ["t2[0-9]\\b"], "action": "flag"}]},
]}
BLOCKING = {"policies": [{"name": "blocking", "output": [{"name": "any-t", "type": "regex", "patterns": ["t[0-9]+"],
                                                           "action": "block"}]}]}


@pytest.fixture(scope="module")
def servers(tiny_ckpt):
    with LiveServer(create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, guardrails=parse(POLICY))) as a, \
            LiveServer(create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, guardrails=parse(BLOCKING))) as b, \
            LiveServer(create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL)) as plain:
        yield a, b, plain


def test_a_blocked_prompt_is_a_400_naming_the_rule(servers):
    a, _, _ = servers
    with pytest.raises(openai.BadRequestError) as e:
        a.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t5 t77 t6"}])
    assert e.value.code == "content_policy_violation" and "no-secrets" in str(e.value)
    assert a.client().chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices  # still serving


def test_redacted_answers_never_show_the_span(servers):
    a, _, plain = servers
    seen_redaction = False
    for seed in range(6):
        kw = dict(model=MODEL, messages=MSG, max_tokens=40, temperature=1.0, seed=seed)
        raw = plain.client().chat.completions.create(**kw).choices[0].message.content
        text = a.client().chat.completions.create(**kw).choices[0].message.content
        streamed = "".join(ch.choices[0].delta.content or "" for ch in
                           a.client().chat.completions.create(**kw, stream=True) if ch.choices)
        assert not re.search(r"t1[0-9]\b", text) and not re.search(r"t1[0-9]\b", streamed)
        assert text == streamed == re.sub(r"t1[0-9]\b", "[REDACTED:tens]", raw)
        seen_redaction |= "[REDACTED:tens]" in text
    assert seen_redaction  # the seeds above do produce such tokens


def test_a_blocked_answer_stream_ends_with_an_error_and_shows_nothing(servers):
    _, b, _ = servers
    got = []
    with pytest.raises(openai.APIError) as e:
        for ch in b.client().chat.completions.create(model=MODEL, messages=MSG, max_tokens=20, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    assert "any-t" in str(e.value) and not any(re.search(r"t[0-9]", g) for g in got)
    with pytest.raises(openai.BadRequestError) as e:
        b.client().completions.create(model=MODEL, prompt="t5 t6", max_tokens=8)
    assert e.value.code == "content_policy_violation"


def test_flags_are_counted_and_the_policy_is_in_the_fingerprint(servers):
    a, b, plain = servers
    a.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t9 t9"}], max_tokens=2)
    m = a.metrics()
    assert m['keel_guardrail_hits_total{action="flag",policy="redacting",rule="t9-in",where="prompt"}'] >= 1
    fps = {s.client().chat.completions.create(model=MODEL, messages=MSG, max_tokens=1).system_fingerprint
           for s in (a, plain)}
    fps.add(b.state.fingerprint_for(None))  # b blocks every answer: asked directly
    assert len(fps) == 3  # each policy (and none) gives its own fingerprint


def test_a_bad_policy_file_stops_keel_serve_with_its_reason(tmp_path, capsys):
    from keel.cli import main
    from tests.server.test_cli import free_port
    bad = tmp_path / "g.yaml"
    bad.write_text("policies:\n  - name: p\n    input:\n      - {name: r, type: deny, patterns: ['(a)\\1']}\n")
    assert main(["serve", "--guardrails", str(bad), "--port", str(free_port())]) == 2
    assert "RE2" in capsys.readouterr().err
    assert main(["serve", "--guardrails", str(tmp_path / "missing.yaml"), "--port", str(free_port())]) == 2


def test_a_policy_per_api_key(tiny_ckpt, tmp_path):
    """A policy with `keys` applies to those keys' requests only; the others get the next policy that matches
    (here none), and the fingerprint says which applied."""
    from keel.store.db import Database
    from keel.store.keys import KeyStore
    store = KeyStore(Database(f"sqlite:///{tmp_path / 'keys.sqlite3'}"))
    _, strict = store.create("tenant-a-prod")
    _, lax = store.create("tenant-b")
    policy = parse({"policies": [{"name": "tenant-a", "keys": ["tenant-a-*"], "input": [
        {"name": "no-t77", "type": "deny", "patterns": ["t77\\b"], "action": "block"}]}]})
    app = create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, api_keys=store, guardrails=policy)
    bad = [{"role": "user", "content": "t5 t77 t6"}]
    with LiveServer(app) as server:
        with pytest.raises(openai.BadRequestError) as e:
            server.client(api_key=strict).chat.completions.create(model=MODEL, messages=bad, max_tokens=2)
        assert e.value.code == "content_policy_violation" and "no-t77" in str(e.value)
        fine = server.client(api_key=lax).chat.completions.create(model=MODEL, messages=bad, max_tokens=2)
        ok = server.client(api_key=strict).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert fine.choices and ok.system_fingerprint != fine.system_fingerprint


def test_policy_keys_must_be_a_list_of_patterns():
    with pytest.raises(Exception, match="keys"):
        parse({"policies": [{"name": "p", "keys": "tenant-a"}]})
