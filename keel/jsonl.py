"""JSONL as every keel command and endpoint reads it: one JSON value per line, blank lines skipped, the
first bad line named."""

from __future__ import annotations

import json
from typing import Iterator

from keel.errors import KeelError


def read_text(path: str, what: str = "") -> str:
    """A UTF-8 file's text; KeelError with the reason (what: "the suite ", say, for the message)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise KeelError(f"cannot read {what}{path}: {e}") from None


def records(text: str, where: str = "", error: type[Exception] = KeelError) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed value) of every non-blank line; `error` naming the first line that is
    not JSON (where: a prefix such as "train.jsonl " for the message)."""
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw)
        except ValueError as e:
            raise error(f"{where}line {n} is not valid JSON: {e}") from None
