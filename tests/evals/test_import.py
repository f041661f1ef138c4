"""`keel eval import`: hosted-API logs into an eval suite or a fine-tuning file keel accepts."""

from __future__ import annotations

import json

from keel.cli import main
from keel.evals.suite import load_suite
from keel.finetune.data import parse_jsonl

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def _completion(content=None, calls=None, cid="chatcmpl-1"):
    msg = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = calls
    return {"id": cid, "object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_logged_pairs_become_a_suite_and_a_finetuning_file(tmp_path, capsys):
    call = [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}]
    logs = _write(tmp_path / "logs.jsonl", [
        {"request": {"model": "gpt-4o-mini", "messages": MSGS, "temperature": 0.2, "max_tokens": 20},
         "response": _completion("Paris.")},
        {"request": {"model": "gpt-4o-mini", "messages": MSGS, "tools": TOOLS}, "response": _completion(calls=call, cid="c2")},
        {"request": {"model": "gpt-4o-mini", "messages": MSGS,
                     "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
         "response": _completion('{"city": "Paris"}', cid="c3")},
        {"request": {"messages": MSGS}, "response": {"error": {"message": "rate limited"}}},  # failed: skipped
    ])
    assert main(["eval", "import", logs, "-o", str(tmp_path / "suite.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "wrote 3 eval cases" in err and "1 failed responses skipped" in err
    cases = load_suite(str(tmp_path / "suite.jsonl"))
    assert [c.expected for c in cases] == ["Paris.", "", '{"city": "Paris"}']
    assert cases[0].temperature == 0.2 and cases[0].max_tokens == 20
    assert cases[1].tools == TOOLS and cases[2].schema == {"type": "object"}
    assert main(["eval", "import", logs, "--as-finetune", "-o", str(tmp_path / "ft.jsonl")]) == 0
    records = parse_jsonl((tmp_path / "ft.jsonl").read_bytes(), "fine-tune")  # what POST /v1/files accepts
    assert len(records) == 3 and records[0]["messages"][-1] == {"role": "assistant", "content": "Paris.", "weight": 1}
    assert records[1]["messages"][-1]["tool_calls"][0]["function"]["name"] == "lookup" and records[1]["tools"] == TOOLS


def test_batch_api_output_joins_its_input_by_custom_id(tmp_path):
    inputs = _write(tmp_path / "in.jsonl", [
        {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": MSGS}},
        {"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": MSGS[1:]}}])
    output = _write(tmp_path / "out.jsonl", [
        {"id": "b1", "custom_id": "r2", "response": {"status_code": 200, "body": _completion("Paris")}, "error": None},
        {"id": "b2", "custom_id": "r1", "response": {"status_code": 500, "body": {}}, "error": None}])
    assert main(["eval", "import", output, "--requests", inputs]) == 0
    cases = load_suite(str(tmp_path / "out.suite.jsonl"))
    assert len(cases) == 1 and cases[0].id == "r2" and cases[0].messages == MSGS[1:] and cases[0].expected == "Paris"
    assert main(["eval", "import", output]) == 2  # without the input file the requests are unknown
