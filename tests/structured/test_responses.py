"""The Responses API's function tools and text.format on the built-in model (grammars need its
tokenizer): a forced call, the same call streamed as an item with argument deltas, its result sent
back as a function_call_output item, and a JSON answer in a json_schema format."""

from __future__ import annotations

import json

import pytest

from keel.models.loader import DEFAULT_MODEL_NAME as MODEL

# the built-in model behind every test here: the full suite runs them, the fast tier does not
pytestmark = pytest.mark.slow

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                       "required": ["city"], "additionalProperties": False}}
ASK = "What is the weather in Paris?"


def test_function_tools_round_trip(server):
    client = server.client()
    kw = dict(model=MODEL, input=ASK, tools=[TOOL], tool_choice="required", parallel_tool_calls=False,
              max_output_tokens=60, temperature=0)
    r = client.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    assert set(json.loads(calls[0].arguments)) == {"city"} and r.status == "completed"
    args, added = "", []
    for e in client.responses.create(**kw, stream=True):
        if e.type == "response.output_item.added":
            added.append(e.item.type)
        if e.type == "response.function_call_arguments.delta":
            args += e.delta
        if e.type == "response.function_call_arguments.done":
            assert e.arguments == args
    assert added == ["function_call"] and args == calls[0].arguments
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, max_output_tokens=30, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "Sunny, 21 degrees"}])
    assert follow.output_text and follow.status in ("completed", "incomplete")
    assert [i.type for i in client.responses.input_items.list(follow.id).data] == ["function_call_output"]
    server.wait_idle()


def test_json_schema_text_format(server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
              "required": ["city"], "additionalProperties": False}
    r = server.client().responses.create(model=MODEL, input=ASK, max_output_tokens=40, text={
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert set(json.loads(r.output_text)) == {"city"}
