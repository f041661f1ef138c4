"""Guardrail policies: rules on what goes into a model and what comes out, the company's own.

    # guardrails.yaml (keel serve --guardrails guardrails.yaml)
    policies:
      - name: tenant-a
        models: ["*"]
        keys: ["tenant-a-*"]                # API key name (or id) patterns: only these keys' requests
        input:
          - {name: no-code-names, type: deny, patterns: ["(?i)falcon-[0-9]+"], action: block}
      - name: default
        models: ["*"]                       # model / adapter name patterns; the first policy that matches applies
        input:
          - {name: no-secrets, type: deny, patterns: ["(?i)api[_-]?key\\s*[:=]"], action: block}
          - {name: no-weapons, type: topics, keywords: [nerve agent, pipe bomb], action: block}
          - {name: size, type: max_length, chars: 20000, action: block}
          - {name: pii, type: pii, kinds: [email, phone, card, iban], action: redact}
        output:
          - {name: pii-out, type: pii, kinds: [email, card], action: redact}
          - {name: codename, type: regex, patterns: ["PROJECT-[0-9]{4}"], action: flag}

Actions: block (a 400 `content_policy_violation` naming the rule; mid-stream, an error event), redact
(the match becomes [REDACTED:<rule>]), flag (logged and counted in /metrics; the text is untouched).
Patterns are RE2 (google-re2, already keel's choice for adapter configs): matching time is linear in
the text, so no pattern a policy author writes can stall the server, and none need be trusted. Card
numbers must pass the Luhn check and IBANs the ISO 7064 mod-97 check, so ordinary numbers are left alone.
Output rules work on streams: the last `hold_chars` characters (64 by default, per policy) are held back
until what follows shows whether a rule matches there, so no blocked or redacted span ever reaches the
client, as long as no rule matches more than that many characters.
The policies' digest is their `version`, part of every response's `system_fingerprint`.
A classifier model (a guard model served by keel) fits as another rule type with the same interface
(`scan(text) -> matches`); only rule-based types exist so far.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from dataclasses import dataclass

from keel.errors import KeelError

log = logging.getLogger("keel.guardrails")
ACTIONS = ("block", "redact", "flag")
HOLD = 64  # characters of a stream held back: the longest span a rule is expected to match
PII = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": r"(\+[0-9]{1,3}[ .-]?)?(\([0-9]{2,4}\)[ .-]?)?[0-9]{2,4}[ .-][0-9]{3,4}[ .-][0-9]{3,4}",
    "card": r"\b[0-9](?:[ -]?[0-9]){12,18}\b",
    "iban": r"\b[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]){11,30}\b",
}


def luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return len(digits) >= 13 and total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    s = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in s)) % 97 == 1
    except ValueError:
        return False


CHECKS = {"card": luhn, "iban": iban_ok}


class PolicyViolation(KeelError):
    def __init__(self, rule: str, where: str) -> None:
        super().__init__(f"The {where} was blocked by the content policy rule `{rule}`.")
        self.rule, self.where = rule, where


def _compile(pattern: str, where: str):
    import re2
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error:
        raise KeelError(f"{where}: {pattern!r} is not an RE2 pattern (linear-time syntax: no backreferences or "
                        f"look-around)") from None


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    matchers: tuple  # (compiled pattern, validator or None)
    max_chars: int | None = None

    def spans(self, text: str) -> list[tuple[int, int]]:
        out = []
        for pattern, valid in self.matchers:
            for m in pattern.finditer(text):
                if m.end() > m.start() and (valid is None or valid(m.group(0))):
                    out.append((m.start(), m.end()))
        return sorted(out)


def _rule(spec: dict, where: str) -> Rule:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise KeelError(f"{where}: each rule needs a `name`")
    where = f"{where} rule {spec['name']}"
    action = spec.get("action", "block")
    if action not in ACTIONS:
        raise KeelError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
    kind = spec.get("type")
    if kind in ("deny", "regex"):
        pats = spec.get("patterns")
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) for p in pats):
            raise KeelError(f"{where}: `patterns` must be a list of strings")
        return Rule(spec["name"], action, tuple((_compile(p, where), None) for p in pats))
    if kind == "topics":
        words = spec.get("keywords")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise KeelError(f"{where}: `keywords` must be a list of words or phrases")
        import re2
        alternation = "|".join(re2.escape(w.strip()).replace(r"\ ", r"\s+") for w in words)
        return Rule(spec["name"], action, ((_compile(rf"(?i)\b(?:{alternation})\b", where), None),))
    if kind == "pii":
        kinds = spec.get("kinds", list(PII))
        if not isinstance(kinds, list) or not kinds or any(k not in PII for k in kinds):
            raise KeelError(f"{where}: `kinds` must be a list of {', '.join(PII)}")
        return Rule(spec["name"], action, tuple((_compile(PII[k], where), CHECKS.get(k)) for k in kinds))
    if kind == "max_length":
        chars = spec.get("chars")
        if not isinstance(chars, int) or isinstance(chars, bool) or chars <= 0:
            raise KeelError(f"{where}: `chars` must be a positive integer")
        return Rule(spec["name"], action, (), chars)
    raise KeelError(f"{where}: type {kind!r} is not one of deny, topics, max_length, pii, regex")


@dataclass(frozen=True)
class Policy:
    name: str
    models: tuple[str, ...]
    input: tuple[Rule, ...]
    output: tuple[Rule, ...]
    version: str  # digest of the policy as written
    hold_chars: int = HOLD  # how much of a stream is held back: at least the longest span a rule may match
    keys: tuple[str, ...] | None = None  # API key name or id patterns; None: requests with any key or none

    def applies_to(self, model: str, key=None) -> bool:
        """key: the request's keel.store.keys.APIKey (None: no key, or the single --api-key)."""
        if self.keys is not None and (key is None or not any(
                fnmatch.fnmatchcase(key.name, p) or fnmatch.fnmatchcase(key.id, p) for p in self.keys)):
            return False
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)


class Guardrails:
    def __init__(self, policies: list[Policy]) -> None:
        self.policies = policies
        self.on_flag = None  # called with (policy, rule, where) for each flag: metrics

    def for_request(self, model: str, key=None) -> Policy | None:
        """The first policy for this model and API key."""
        return next((p for p in self.policies if p.applies_to(model, key)), None)


def parse(data) -> Guardrails:
    if not isinstance(data, dict) or not isinstance(data.get("policies"), list) or not data["policies"]:
        raise KeelError("the guardrails file needs `policies`: a list of {name, models, input, output}")
    policies = []
    for i, spec in enumerate(data["policies"]):
        where = f"policies[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise KeelError(f"{where}: each policy needs a `name`")
        models = spec.get("models", ["*"])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise KeelError(f"{where}: `models` must be a list of name patterns")
        keys = spec.get("keys")
        if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
            raise KeelError(f"{where}: `keys` must be a list of API key name or id patterns")
        rules = {side: tuple(_rule(r, f"{where}.{side}") for r in (spec.get(side) or [])) for side in ("input", "output")}
        version = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        hold = spec.get("hold_chars", HOLD)
        if not isinstance(hold, int) or isinstance(hold, bool) or not 1 <= hold <= 65536:
            raise KeelError(f"{where}: hold_chars must be an integer in [1, 65536]")
        policies.append(Policy(spec["name"], tuple(models), rules["input"], rules["output"], version, hold,
                               None if keys is None else tuple(keys)))
    return Guardrails(policies)


def load(path: str) -> Guardrails:
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            return parse(yaml.safe_load(f))
    except OSError as e:
        raise KeelError(f"--guardrails {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise KeelError(f"--guardrails {path}: not valid YAML ({e})") from None


def apply(rules: tuple[Rule, ...], text: str, where: str, flagged: list[str]) -> str:
    """`text` under the rules: PolicyViolation for a block, redactions applied, flags appended to `flagged`."""
    for rule in rules:
        if rule.max_chars is not None:
            hit = len(text) > rule.max_chars
            if hit and rule.action == "redact":
                text = text[:rule.max_chars]
        else:
            spans = rule.spans(text)
            hit = bool(spans)
            if hit and rule.action == "redact":
                text = _redact(text, spans, rule.name)
        if hit and rule.action == "block":
            raise PolicyViolation(rule.name, where)
        if hit and rule.action == "flag":
            flagged.append(rule.name)
    return text


def _redact(text: str, spans: list[tuple[int, int]], name: str) -> str:
    return _redact_spans(text, [(s, e, name) for s, e in spans])


def _redact_spans(text: str, spans: list[tuple[int, int, str]]) -> str:
    """Each (start, end, rule) span of text replaced by [REDACTED:rule]; overlapping spans merge."""
    out, at = [], 0
    for s, e, name in sorted(spans):
        if e <= at:
            continue
        if s < at:  # overlaps the previous span: its rest is part of that redaction
            s = at
            out.append("")
        else:
            out += [text[at:s], f"[REDACTED:{name}]"]
        at = e
    return "".join(out + [text[at:]])


class OutputFilter:
    """One choice's streamed text under output rules. feed(delta) returns the text that may go out now;
    finish() the rest. Text is released only once HOLD characters follow it (or the stream ended), so a
    match is seen whole before any of it leaves."""

    def __init__(self, rules: tuple[Rule, ...], flagged: list[str], hold: int = HOLD) -> None:
        self.rules, self.flagged, self.hold = rules, flagged, hold
        self.pending = ""
        self.released = 0  # characters of the raw text already decided on
        self.total = 0  # characters of the raw text seen
        self.flags_seen: set[str] = set()

    def _checked(self, text: str, final: bool) -> tuple[str, str]:
        """(what can go out, what stays pending) of `text`, the unreleased raw text."""
        spans_by_rule = [(r, r.spans(text)) for r in self.rules if r.max_chars is None]
        cut = len(text) if final else max(0, len(text) - self.hold)
        for _, spans in spans_by_rule:  # never cut through a match: keep all of it pending
            for s, e in spans:
                if s < cut < e:
                    cut = s
        out = text[:cut]
        for rule, spans in spans_by_rule:
            inside = [(s, e) for s, e in spans if e <= cut]
            if not inside:
                continue
            if rule.action == "block":
                raise PolicyViolation(rule.name, "answer")
            if rule.action == "flag" and rule.name not in self.flags_seen:
                self.flags_seen.add(rule.name)
                self.flagged.append(rule.name)
        # redact with the spans found in the whole pending text: the prefix alone can match differently
        # at its end (a word boundary that is none)
        redactions = sorted((s, e, rule.name) for rule, spans in spans_by_rule if rule.action == "redact"
                            for s, e in spans if e <= cut)
        out = _redact_spans(out, redactions)
        for rule in self.rules:
            if rule.max_chars is not None and self.released + cut > rule.max_chars:
                if rule.action == "block":
                    raise PolicyViolation(rule.name, "answer")
                if rule.action == "redact":
                    keep = max(0, rule.max_chars - self.released)
                    out, cut = out[:keep], len(text)  # the rest is dropped
                elif rule.name not in self.flags_seen:
                    self.flags_seen.add(rule.name)
                    self.flagged.append(rule.name)
        return out, text[cut:]

    def feed(self, delta: str) -> str:
        self.total += len(delta)
        out, self.pending = self._checked(self.pending + delta, final=False)
        self.released = self.total - len(self.pending)
        return out

    def finish(self) -> str:
        out, self.pending = self._checked(self.pending, final=True)
        self.released = self.total
        return out
