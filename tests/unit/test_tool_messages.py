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
