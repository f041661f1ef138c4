"""Tool calling on the built-in model (its template has no tool support: the fallback format)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from keel.models.loader import DEFAULT_MODEL_NAME as MODEL
from keel.server.tools import ToolCallStream, parse_tool_calls, prepare_messages

# the built-in model behind every test here: the full suite runs them, the fast tier does not
pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 16}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls, names=("get_weather", "get_time")):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        schema = WEATHER if c.function.name == "get_weather" else TIME
        jsonschema.validate(json.loads(c.function.arguments), schema)


def test_required_and_named_calls_validate(server):
    async def ask_all():  # concurrently, so the three run as one batch
        client = server.async_client()
        common = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0)
        return await asyncio.gather(
            client.chat.completions.create(**common, tool_choice="required", parallel_tool_calls=False, n=3,
                                           seed=11, max_tokens=96),
            # parallel calls: this small model tends to repeat calls until max_tokens
            client.chat.completions.create(**common, tool_choice="required", seed=11, max_tokens=48),
            client.chat.completions.create(**common, n=2, seed=3, max_tokens=96,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}}))
    single, parallel, named = asyncio.run(ask_all())
    for c in single.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1 and not c.message.content
        check_calls(c.message.tool_calls)
    for c in parallel.choices:  # every finished call validates; one cut off by max_tokens is dropped
        check_calls(c.message.tool_calls)
        assert c.finish_reason in ("length", "tool_calls") and not c.message.content
    for c in named.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        check_calls(c.message.tool_calls, ("get_time",))
    server.wait_idle()


def test_auto_calls_the_model_starts_are_completed_validly(server, llm):
    """tool_choice "auto": free text, but once the output contains <tool_call> the rest of the block is
    held to the tools' schemas. This small model rarely calls on its own, so the trigger is taken from its
    free output (its first word stands in for <tool_call>): what follows must be a valid call block."""
    from keel import SamplingParams
    from keel.server.tools import OPEN, call_grammar
    free = llm.chat(ASK, SamplingParams(temperature=1.0, seed=4, max_tokens=16))[0].outputs[0].text
    trigger = free[:free.index(" ", 2)]
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=96, grammar_trigger=trigger,
                            grammar=call_grammar(TOOLS, None, False, after_open=True))
    out = llm.chat(ASK, params)[0].outputs[0]
    assert out.text.startswith(trigger) and out.finish_reason == "stop", out.text
    content, calls = parse_tool_calls(OPEN + out.text[len(trigger):], {"get_weather", "get_time"})
    assert len(calls) == 1 and not content, out.text
    fn = calls[0]["function"]
    jsonschema.validate(json.loads(fn["arguments"]), WEATHER if fn["name"] == "get_weather" else TIME)
    # through the server, auto answers stay free text when the model writes no call
    r = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto",
                                                temperature=1.0, seed=2, n=3, max_tokens=24)
    for c in r.choices:
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
            check_calls(c.message.tool_calls)
        else:
            assert c.message.content and c.finish_reason in ("stop", "length")
    server.wait_idle()


def test_streamed_call_deltas(server):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=5, max_tokens=96, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == "get_weather"
    assert rest and all(c.id is None and c.function.name is None for c in rest)
    jsonschema.validate(json.loads("".join(c.function.arguments for c in calls)), WEATHER)
    assert deltas[-1].finish_reason == "tool_calls"
    server.wait_idle()


def test_tool_results_render_into_the_prompt(server):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    r = server.client().chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                                temperature=0, max_tokens=24)
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
    messages, tools = prepare_messages(history, TOOLS, native=False)
    assert tools is None and "get_time" in messages[0]["content"]
    assert '"city": "Paris"' in messages[2]["content"] and "21" in messages[3]["content"]
    server.wait_idle()


@pytest.mark.parametrize("text", [
    'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>',
    '<tool_call>\n{"arguments": {"timezone": "UTC"}, "name": "get_time"}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>',
    '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
    "no calls < here <tool",
])
def test_streamed_parse_matches_whole_parse(text):
    names = {"get_time", "get_weather"}
    content, calls = parse_tool_calls(text, names)
    for size in (1, 3, 7):
        stream = ToolCallStream(names)
        deltas = [d for k in range(0, len(text), size) for d in stream.feed(text[k:k + size])] + stream.finish()
        got_text = "".join(d.get("content", "") for d in deltas)
        got_calls: dict[int, dict] = {}
        for d in deltas:
            for c in d.get("tool_calls", []):
                call = got_calls.setdefault(c["index"], {"name": c["function"].get("name"), "arguments": ""})
                call["arguments"] += c["function"]["arguments"]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
               [(c["name"], json.loads(c["arguments"])) for c in got_calls.values()]
        assert (got_text.strip() or None) == content


# A template in the style of Qwen2.5's: tools listed in the system turn, calls as <tool_call> blocks.
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_native_template_gets_tools_and_call_objects(llm):
    import copy

    from keel.server.chat import render_prompt
    from keel.server.protocol import ChatCompletionRequest
    tok = copy.copy(llm.tokenizer)
    tok.chat_template, tok._compiled = NATIVE_TEMPLATE, None
    body = ChatCompletionRequest.model_validate({"model": MODEL, "tools": TOOLS, "messages": ASK + [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21"}]})
    text = tok.decode(render_prompt(tok, body), skip_special_tokens=False)
    assert '"name": "get_time"' in text and "You can call functions" not in text  # the template's own listing
    # arguments reach the template as an object, not as a JSON string inside a string
    assert '"arguments": {"city": "Paris", "unit": "celsius"}}' in text and "<|im_start|>tool\n21" in text
    body = ChatCompletionRequest.model_validate({"model": MODEL, "tools": TOOLS, "messages": ASK, "tool_choice": "none"})
    assert "get_time" not in tok.decode(render_prompt(tok, body), skip_special_tokens=False)


def _pydantic_tool_schemas():
    """Parameters as pydantic writes them for nested and recursive models (openai.pydantic_function_tool,
    the Agents SDK's @function_tool, instructor): local $defs and $refs, "#/$defs/Node" inside Node."""
    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):  # additionalProperties: false, as strict function tools send it
        model_config = ConfigDict(extra="forbid")

    class Address(Strict):
        city: str = Field(max_length=16)
        country: str = Field(max_length=16)

    class Person(Strict):
        name: str = Field(max_length=16)
        address: Address

    class Node(Strict):
        label: str = Field(max_length=8)
        children: list["Node"] = Field(default_factory=list, max_length=2)

    class Register(Strict):
        person: Person
        tree: Node
    return Register.model_json_schema(), Person.model_json_schema()


def test_tools_with_defs_and_refs_are_accepted_and_enforced(server):
    register, person = _pydantic_tool_schemas()
    assert "$defs" in register and '"$ref": "#/$defs/Node"' in json.dumps(register)
    tools = [{"type": "function", "function": {"name": "register", "parameters": register}},
             {"type": "function", "function": {"name": "greet", "parameters": person}}]
    client = server.client()
    for choice in ("none", "auto"):  # refused before (400 "Pointer '/$defs/...' does not exist"), whatever tool_choice
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice=choice, max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # a forced call of the recursive schema: this small model nests Node in Node until max_tokens, so
    # the calls checked to the end are the nested (non-recursive) ones
    for name, schema in (("greet", person),):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, seed=5, temperature=0.7,
                                           max_tokens=200, tool_choice={"type": "function", "function": {"name": name}})
        assert r.choices[0].message.tool_calls, (r.choices[0].finish_reason, r.choices[0].message.content)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments), schema)
    server.wait_idle()


ANSWER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}


def test_tools_with_a_response_format_under_auto_allow_either_outcome(server, llm):
    """The output is a valid call or a valid answer in the format, never free text. Which one is the
    model's choice; a bias on its first token ('<' starts a call block, '{' the answer) picks each."""
    tok = llm.tokenizer
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": ANSWER}}
    client = server.client()
    outcomes = {}
    for first in ("<", "{"):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto",
                                           response_format=fmt, max_tokens=120, temperature=0,
                                           parallel_tool_calls=False, logit_bias={str(tok.token_to_id(first)): 100})
        c = r.choices[0]
        if c.message.tool_calls:
            check_calls(c.message.tool_calls)
            assert c.finish_reason == "tool_calls"
            outcomes[first] = "call"
        else:
            jsonschema.validate(json.loads(c.message.content), ANSWER)
            outcomes[first] = "answer"
    assert outcomes == {"<": "call", "{": "answer"}
    for seed in range(4):  # unbiased, sampled: each output is one or the other
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, response_format=fmt, seed=seed,
                                           max_tokens=120)
        c = r.choices[0]
        if c.message.tool_calls:
            check_calls(c.message.tool_calls)
        elif c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), ANSWER)
    server.wait_idle()


def test_streamed_tool_calls_carry_logprobs(server):
    client = server.client()
    common = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  seed=2, temperature=0.8, max_tokens=96, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**common)
    stream = client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True})
    lps, args = [], ""
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                lps += c.logprobs.content
            for call in c.delta.tool_calls or []:
                args += call.function.arguments or ""
    assert [e.token for e in lps] == [e.token for e in whole.choices[0].logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in lps)
    assert args == whole.choices[0].message.tool_calls[0].function.arguments and not args.startswith(" ")
    server.wait_idle()


def test_openai_pydantic_function_tool_schemas_are_enforced(server):
    """openai.pydantic_function_tool writes strict schemas with $defs for nested models."""
    import openai
    from pydantic import BaseModel, ConfigDict, Field

    class Address(BaseModel):
        model_config = ConfigDict(extra="forbid")
        city: str = Field(max_length=16)

    class Greet(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=16)
        address: Address

    tool = openai.pydantic_function_tool(Greet)
    assert "$defs" in tool["function"]["parameters"]
    r = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=[tool], max_tokens=120, seed=1,
                                                tool_choice={"type": "function", "function": {"name": "Greet"}})
    Greet.model_validate_json(r.choices[0].message.tool_calls[0].function.arguments)
