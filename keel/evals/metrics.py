"""Per-case comparison of two targets' answers: exact match, similarity (the built-in embedding model's
cosine), agreement with an expected answer, JSON-schema validity, tool-call agreement, latency, tokens."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field

from keel.evals.suite import Case
from keel.evals.targets import Answer


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _calls(a: Answer) -> list:
    out = []
    for c in a.tool_calls:
        try:
            args = json.loads(c["arguments"])
        except (ValueError, TypeError):
            args = c["arguments"]
        out.append((c["name"], args))
    return out


def _valid(text: str, schema: dict) -> bool:
    import jsonschema
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
        return False


def shown(a: Answer) -> str:
    """An answer as text: its content, then its tool calls."""
    calls = "".join(f"\n[call {c['name']}({c['arguments']})]" for c in a.tool_calls)
    return (a.text + calls).strip() if not a.error else f"[error: {a.error}]"


@dataclass
class CaseResult:
    case: Case
    a: list[Answer]
    b: list[Answer]
    exact: float = 0.0  # share of samples where A and B answered the same (text and tool calls)
    similarity: float = 0.0  # mean cosine similarity of A's and B's answers
    expected_a: float | None = None  # share of A's samples that agree with the expected answer
    expected_b: float | None = None
    json_valid_a: float | None = None
    json_valid_b: float | None = None
    tools_agree: float | None = None
    similarities: list[float] = field(default_factory=list)


def compare(cases: list[Case], a: dict, b: dict, embed) -> list[CaseResult]:
    """a, b: (case id, sample) -> Answer; embed(list of texts) -> unit vectors [n, d] (torch)."""
    results = [CaseResult(c, [a[(c.id, s)] for s in range(c.samples)], [b[(c.id, s)] for s in range(c.samples)])
               for c in cases]
    texts = [shown(x) for r in results for pair in zip(r.a, r.b) for x in pair]
    vectors = embed(texts) if texts else None
    k = 0
    for r in results:
        sims = []
        for x, y in zip(r.a, r.b):
            sims.append(float((vectors[k] * vectors[k + 1]).sum()) if shown(x) or shown(y) else 1.0)
            k += 2
        r.similarities = sims
        r.similarity = statistics.fmean(sims)
        r.exact = statistics.fmean(float(x.text == y.text and _calls(x) == _calls(y) and not x.error and not y.error)
                                   for x, y in zip(r.a, r.b))
        if r.case.expected is not None:
            want = normalized(r.case.expected)
            r.expected_a = statistics.fmean(float(normalized(x.text) == want) for x in r.a)
            r.expected_b = statistics.fmean(float(normalized(y.text) == want) for y in r.b)
        if r.case.schema is not None:
            r.json_valid_a = statistics.fmean(float(_valid(x.text, r.case.schema)) for x in r.a)
            r.json_valid_b = statistics.fmean(float(_valid(y.text, r.case.schema)) for y in r.b)
        if r.case.tools:
            r.tools_agree = statistics.fmean(float(_calls(x) == _calls(y)) for x, y in zip(r.a, r.b))
    return results


def summary(results: list[CaseResult]) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None
    answers_a = [x for r in results for x in r.a]
    answers_b = [y for r in results for y in r.b]
    return {
        "cases": len(results), "samples": len(answers_a),
        "exact_match": mean(r.exact for r in results),
        "similarity": mean(r.similarity for r in results),
        "min_similarity": min(s for r in results for s in r.similarities),
        "expected_a": mean(r.expected_a for r in results), "expected_b": mean(r.expected_b for r in results),
        "json_valid_a": mean(r.json_valid_a for r in results), "json_valid_b": mean(r.json_valid_b for r in results),
        "tools_agree": mean(r.tools_agree for r in results),
        "errors_a": sum(1 for x in answers_a if x.error), "errors_b": sum(1 for y in answers_b if y.error),
        "latency_a": mean(x.latency for x in answers_a), "latency_b": mean(y.latency for y in answers_b),
        "tokens_a": mean(x.completion_tokens for x in answers_a), "tokens_b": mean(y.completion_tokens for y in answers_b),
    }
