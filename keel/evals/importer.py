"""`keel eval import LOGS.jsonl`: a hosted API's request/response logs as an eval suite whose expected
answers are the hosted model's (to measure how close an open model gets before switching), or with
`--as-finetune` as a fine-tuning file (to distil those answers into an open model).

Accepted lines:
- a logged pair: {"request": {chat completion body}, "response": {chat.completion object}} (also
  "body" for the request, or the request's fields at the top level beside "response");
- the Batch API's output ({"custom_id", "response": {"status_code", "body": {chat.completion}}}), joined
  by custom_id with the batch input file given as --requests ({"custom_id", "body": {request}}).
Failed or unfinished responses (an error, a non-200 status, no choices) are skipped and counted.
"""

from __future__ import annotations


from keel.errors import KeelError
from keel.jsonl import read_text, records

SAMPLING = ("temperature", "max_tokens", "max_completion_tokens", "seed")


def _lines(path: str) -> list[tuple[int, dict]]:
    out = []
    for n, obj in records(read_text(path), f"{path} "):
        if not isinstance(obj, dict):
            raise KeelError(f"{path} line {n}: expected a JSON object")
        out.append((n, obj))
    return out


def _pairs(path: str, requests: str | None) -> tuple[list[tuple[str, dict, dict]], int]:
    """(id, request body, chat.completion) of every usable line, and how many were skipped."""
    by_custom = {}
    if requests:
        for n, obj in _lines(requests):
            if isinstance(obj.get("custom_id"), str) and isinstance(obj.get("body"), dict):
                by_custom[obj["custom_id"]] = obj["body"]
    pairs, skipped = [], 0
    for n, obj in _lines(path):
        response = obj.get("response")
        if isinstance(response, dict) and "body" in response and "status_code" in response:  # Batch API output
            if response.get("status_code") != 200 or obj.get("error"):
                skipped += 1
                continue
            response = response["body"]
            request = by_custom.get(obj.get("custom_id"))
            if request is None:
                raise KeelError(f"{path} line {n}: batch output {obj.get('custom_id')!r} has no request: give the "
                                f"batch input file with --requests")
        else:
            request = obj.get("request") or obj.get("body") or {k: v for k, v in obj.items() if k != "response"}
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            raise KeelError(f"{path} line {n}: no request messages (expected {{\"request\": {{...}}, \"response\": "
                            f"{{...}}}} or Batch API output with --requests)")
        if not isinstance(response, dict) or not response.get("choices"):
            skipped += 1
            continue
        pairs.append((str(obj.get("custom_id") or obj.get("id") or response.get("id") or f"line-{n}"), request, response))
    return pairs, skipped


def _assistant(response: dict) -> dict:
    message = response["choices"][0].get("message") or {}
    out = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out


def to_suite(path: str, requests: str | None = None) -> tuple[list[dict], int]:
    cases = []
    pairs, skipped = _pairs(path, requests)
    for i, (cid, request, response) in enumerate(pairs):
        case = {"id": cid if cid not in {c["id"] for c in cases} else f"{cid}-{i}", "messages": request["messages"],
                "expected": _assistant(response)["content"]}
        for key in SAMPLING:
            if request.get(key) is not None:
                case["max_tokens" if key == "max_completion_tokens" else key] = request[key]
        if request.get("tools"):
            case["tools"] = request["tools"]
        fmt = request.get("response_format") or {}
        if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
            case["schema"] = fmt["json_schema"].get("schema")
        cases.append(case)
    return cases, skipped


def to_finetune(path: str, requests: str | None = None) -> tuple[list[dict], int]:
    pairs, skipped = _pairs(path, requests)
    out = []
    for _, request, response in pairs:
        line = {"messages": [*request["messages"], _assistant(response)]}
        if request.get("tools"):
            line["tools"] = request["tools"]
        out.append(line)
    return out, skipped
