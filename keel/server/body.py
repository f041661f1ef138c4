"""JSON from a client, checked before anything else reads it: it parses, nests at most `max_depth`
levels, holds only finite numbers and only text that is valid Unicode.

Python's json module accepts what would break code further in: a lone UTF-16 surrogate (`"\\ud800"`)
becomes a str that the tokenizer and the response encoder cannot encode; NaN and Infinity are not
JSON; ten thousand nested brackets raise RecursionError in whatever walks them next. Each of these is
a 400 here, naming where in the body it was found.
"""

from __future__ import annotations

import json
from typing import Any

from keel.server.errors import APIError, path_str


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str, max_depth: int, what: str = "The request body") -> Any:
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise APIError(400, f"{what} nests arrays or objects deeper than {max_depth} levels.",
                       code="invalid_json") from None
    except ValueError as e:  # also invalid UTF-8 (UnicodeDecodeError) and over-long integers
        raise APIError(400, f"{what} is not valid JSON: {e}", code="invalid_json") from None
    check_tree(data, max_depth, what)
    return data


def bad_text(s: str) -> str | None:
    """Why `s` is not valid Unicode text (None when it is)."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"it holds a lone UTF-16 surrogate ({s[e.start]!a}), which is not valid Unicode text"
    return None


def check_tree(data: Any, max_depth: int, what: str = "The request body") -> None:
    """Walks `data` without recursion: depth, text, and numbers (raises APIError 400)."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            reason = bad_text(node)
            if reason:
                where = path_str(path)
                raise APIError(400, f"Invalid value for '{where}': {reason}." if where else f"{what}: {reason}.",
                               code="invalid_value", param=where)
        elif isinstance(node, (dict, list)):
            if depth >= max_depth:
                raise APIError(400, f"{what} nests arrays or objects deeper than {max_depth} levels "
                                    f"(at '{path_str(path)}').", code="invalid_json", param=path_str(path))
            if isinstance(node, dict):
                for key, value in node.items():
                    reason = bad_text(key)
                    if reason:
                        where = path_str(path)
                        raise APIError(400, f"A key in '{where or 'the body'}' is not valid: {reason}.",
                                       code="invalid_value", param=where)
                    stack.append((value, (*path, key), depth + 1))
            else:
                stack.extend((v, (*path, i), depth + 1) for i, v in enumerate(node))


def depth_ok(data: Any, max_depth: int) -> bool:
    """True when `data` nests at most `max_depth` levels (for values that did not come from a body)."""
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= max_depth:
                return False
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return True


def documented(model) -> dict:
    """`openapi_extra` for a route that reads its body by hand (see keel.server.app.read_body): the
    request schema, so /openapi.json and /docs show it."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
