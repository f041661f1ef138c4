"""How messages reach a chat template without tool support (the fallback of keel.server.tools):
content given as text parts reads as text, never as a Python list."""

from keel.server.tools import prepare_messages

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
PARTS = [{"type": "text", "text": "sunny,"}, {"type": "text", "text": "21C"}]


def test_text_parts_in_tool_results_and_calls_are_text():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}],
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": PARTS},
    ]
    out, tools = prepare_messages(messages, TOOLS, native=False)
    assert tools is None
    rendered = "\n".join(m["content"] for m in out)
    assert "{'type'" not in rendered and "[{" not in rendered
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert out[2]["content"].startswith("Let me look.\n<tool_call>")
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny,\n21C\n</tool_response>"}


def _stream(pieces, cut=False):
    from keel.server.tools import ToolCallStream
    s = ToolCallStream({"get_weather"})
    out = []
    for p in pieces:
        out += s.feed(p)
    return out + s.finish(cut=cut)


def test_streamed_arguments_start_at_the_value_not_at_a_space():
    # the space after "arguments": arrives in its own piece, as tokens do
    out = _stream(["<tool_call>\n", '{"name": "get_weather", "arguments":', ' ', '{"city": ', '"Paris"}', "}\n</tool_call>"])
    args = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in out if "tool_calls" in d)
    assert args == '{"city": "Paris"}'
    assert not any(d.get("content") for d in out)


def test_a_call_cut_off_by_max_tokens_leaves_no_markup():
    from keel.server.tools import parse_tool_calls
    done = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for tail in ("\n<tool_call>\n{\"na", "\n<tool_ca", "\n<"):
        content, calls = parse_tool_calls(done + tail, {"get_weather"}, cut=True)
        assert content is None and len(calls) == 1, (tail, content)
        out = _stream([done, tail], cut=True)
        assert not any(d.get("content") for d in out), (tail, out)
        assert sum(1 for d in out if "tool_calls" in d and "id" in d["tool_calls"][0]) == 1
    # not cut: an unfinished block is what the model wrote, and the client sees it
    content, _ = parse_tool_calls(done + "\n<tool_call>\n{\"na", {"get_weather"})
    assert content.startswith("<tool_call>")


def test_parallel_calls_are_bounded_in_the_grammar():
    from keel.server.tools import MAX_CALLS, call_grammar
    assert f"{{0,{MAX_CALLS - 1}}}" in call_grammar(TOOLS, None, parallel=True)
    assert "{0," not in call_grammar(TOOLS, None, parallel=False)
