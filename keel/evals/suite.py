"""An eval suite: JSONL, one case per line.

    {"id": "refund-1", "messages": [...], "expected": "...", "schema": {...}, "tools": [...],
     "temperature": 0, "max_tokens": 128, "seed": 0, "samples": 1}

Only `messages` is required. `expected` is an answer to agree with; `schema` a JSON schema the answer
must satisfy (it is sent as response_format json_schema); `tools` are sent as tools and the calls compared.
Sampling settings default to greedy (temperature 0), 256 tokens, seed 0, one sample; a case with
temperature > 0 may ask for several samples (each with its own seed), compared pairwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keel.errors import KeelError
from keel.jsonl import read_text, records

KEYS = {"id", "messages", "expected", "schema", "tools", "temperature", "max_tokens", "seed", "samples"}


@dataclass
class Case:
    id: str
    messages: list[dict]
    expected: str | None = None
    schema: dict | None = None
    tools: list[dict] | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int = 0
    samples: int = 1
    extra: dict = field(default_factory=dict)

    def request(self, sample: int) -> dict:
        """The chat completion request of one sample (model left to the target)."""
        body = {"messages": self.messages, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "seed": self.seed + sample}
        if self.schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": self.schema}}
        if self.tools:
            body["tools"] = self.tools
        return body


def load_suite(path: str) -> list[Case]:
    """The cases of a suite file; KeelError naming the line of the first bad one."""
    cases, seen = [], set()
    for n, obj in records(read_text(path, "the suite "), f"{path} "):
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
            raise KeelError(f"{path} line {n}: a case is an object with a non-empty `messages` list")
        unknown = set(obj) - KEYS
        if unknown:
            raise KeelError(f"{path} line {n}: unknown key(s) {sorted(unknown)}; a case may have {sorted(KEYS)}")
        case = Case(id=str(obj.get("id", f"case-{n}")), messages=obj["messages"], expected=obj.get("expected"),
                    schema=obj.get("schema"), tools=obj.get("tools"), temperature=float(obj.get("temperature", 0.0)),
                    max_tokens=int(obj.get("max_tokens", 256)), seed=int(obj.get("seed", 0)),
                    samples=int(obj.get("samples", 1)))
        if case.id in seen:
            raise KeelError(f"{path} line {n}: case id {case.id!r} is used twice")
        if not 1 <= case.samples <= 64 or (case.samples > 1 and case.temperature == 0):
            raise KeelError(f"{path} line {n}: samples must be 1-64, and above 1 only with temperature > 0")
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise KeelError(f"the suite {path} has no cases")
    return cases
