"""Guardrail rules on their own: each type blocks, redacts or flags as configured; streamed output is
held back until checked, so no blocked or redacted span ever goes out, wherever the deltas split it."""

from __future__ import annotations

import pytest

from keel.errors import KeelError
from keel.gateway.guardrails import OutputFilter, PolicyViolation, apply, iban_ok, luhn, parse

CARD = "4111 1111 1111 1111"  # a test Visa number: passes Luhn
IBAN = "DE89 3704 0044 0532 0130 00"  # the standard example: passes mod 97


def rules(*specs, side="output"):
    return getattr(parse({"policies": [{"name": "p", side: list(specs)}]}).policies[0], side)


def test_checksums():
    assert luhn(CARD) and not luhn("4111 1111 1111 1112") and not luhn("1234")
    assert iban_ok(IBAN) and not iban_ok("DE89 3704 0044 0532 0130 01")


@pytest.mark.parametrize("spec, text, expected", [
    ({"type": "pii", "kinds": ["email"]}, "mail bob.smith@example.co.uk now", "mail [REDACTED:r] now"),
    ({"type": "pii", "kinds": ["card"]}, f"card {CARD}.", "card [REDACTED:r]."),
    ({"type": "pii", "kinds": ["card"]}, "order 4111 1111 1111 1112 ok", "order 4111 1111 1111 1112 ok"),  # fails Luhn
    ({"type": "pii", "kinds": ["iban"]}, f"pay {IBAN} today", "pay [REDACTED:r] today"),
    ({"type": "pii", "kinds": ["iban"]}, "ref DE89 3704 0044 0532 0130 01 x", "ref DE89 3704 0044 0532 0130 01 x"),
    ({"type": "pii", "kinds": ["phone"]}, "call +44 20 7946 0958 please", "call [REDACTED:r] please"),
    ({"type": "regex", "patterns": ["PROJECT-[0-9]{4}"]}, "see PROJECT-1234", "see [REDACTED:r]"),
    ({"type": "topics", "keywords": ["pipe bomb"]}, "how to build a PIPE   bomb", "how to build a [REDACTED:r]"),
    ({"type": "topics", "keywords": ["bomb"]}, "a bombastic speech", "a bombastic speech"),  # whole words only
    ({"type": "max_length", "chars": 5}, "abcdefgh", "abcde"),
])
def test_redact(spec, text, expected):
    assert apply(rules({"name": "r", "action": "redact", **spec}, side="input"), text, "prompt", []) == expected


def test_block_and_flag():
    block = rules({"name": "secrets", "type": "deny", "patterns": ["(?i)api[_-]?key"], "action": "block"}, side="input")
    with pytest.raises(PolicyViolation, match="secrets") as e:
        apply(block, "here is my API_KEY=123", "prompt", [])
    assert e.value.rule == "secrets"
    flagged = []
    flag = rules({"name": "codename", "type": "regex", "patterns": ["PROJECT-[0-9]+"], "action": "flag"}, side="input")
    assert apply(flag, "about PROJECT-7", "prompt", flagged) == "about PROJECT-7" and flagged == ["codename"]
    too_long = rules({"name": "size", "type": "max_length", "chars": 3, "action": "block"}, side="input")
    with pytest.raises(PolicyViolation):
        apply(too_long, "abcd", "prompt", [])


TEXT = f"Write to jane.doe@example.com or pay with {CARD} by Friday, then call the desk."
REDACT = [{"name": "pii", "type": "pii", "kinds": ["email", "card"], "action": "redact"}]


def split_every(text: str, k: int) -> list[str]:
    return [text[i:i + k] for i in range(0, len(text), k)]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 11, 1000])
def test_streamed_redaction_never_leaks_and_matches_the_whole_text(k):
    f = OutputFilter(rules(*REDACT), [])
    pieces = [f.feed(d) for d in split_every(TEXT, k)] + [f.finish()]
    assert "".join(pieces) == apply(rules(*REDACT), TEXT, "answer", [])
    sent = ""
    for p in pieces:  # at no moment has any part of the email or the card number gone out
        sent += p
        for secret in ("jane", "example.com", "1111"):
            assert secret not in sent


@pytest.mark.parametrize("k", [1, 4, 9])
def test_a_streamed_block_stops_before_the_span(k):
    f = OutputFilter(rules({"name": "codename", "type": "regex", "patterns": ["PROJECT-[0-9]{4}"],
                            "action": "block"}), [])
    text = "The plan is called PROJECT-4242 and it is secret." + " More words follow here." * 4
    sent = ""
    with pytest.raises(PolicyViolation, match="codename"):
        for d in split_every(text, k):
            sent += f.feed(d)
        sent += f.finish()
    assert "PROJECT" not in sent and text.startswith(sent)


@pytest.mark.parametrize("bad, word", [
    ({}, "policies"), ({"policies": [{"name": "p", "input": [{"name": "r", "type": "nope"}]}]}, "nope"),
    ({"policies": [{"name": "p", "input": [{"name": "r", "type": "deny", "patterns": ["(a)\\1"]}]}]}, "RE2"),
    ({"policies": [{"name": "p", "input": [{"name": "r", "type": "pii", "kinds": ["ssn"]}]}]}, "kinds"),
    ({"policies": [{"name": "p", "output": [{"name": "r", "type": "regex", "patterns": ["x"], "action": "warn"}]}]},
     "action"),
    ({"policies": [{"name": "p", "input": [{"type": "deny", "patterns": ["x"]}]}]}, "name"),
])
def test_bad_policies_name_the_problem(bad, word):
    with pytest.raises(KeelError, match=word):
        parse(bad)


def test_a_longer_hold_keeps_a_long_match_whole():
    long_mail = "x" * 90 + "@example.com"
    text = f"reach {long_mail} soon " + "filler " * 30
    for hold, leaks in ((64, True), (128, False)):
        policy = parse({"policies": [{"name": "p", "hold_chars": hold, "output": REDACT}]}).policies[0]
        f = OutputFilter(policy.output, [], policy.hold_chars)
        sent = "".join(f.feed(c) for c in text) + f.finish()
        assert ("xxxx" in sent) is leaks  # past the hold, the head of a long match goes out before it is seen
        assert "@example.com" not in sent


def test_the_version_follows_the_policy():
    a = parse({"policies": [{"name": "p", "input": REDACT}]}).policies[0].version
    b = parse({"policies": [{"name": "p", "input": REDACT + REDACT[:0]}]}).policies[0].version
    c = parse({"policies": [{"name": "p", "input": [{**REDACT[0], "kinds": ["email"]}]}]}).policies[0].version
    assert a == b != c
