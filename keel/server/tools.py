"""Tool calling: tools into the prompt, a grammar that forces calls, and calls parsed out of the text.

The model writes each call as a Hermes-style block, the format of Qwen2.5/Qwen3, Hermes and many
other open models:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that takes `tools` (its source uses the variable) renders the tools, earlier calls
and tool results its own way. For a template without tool support, the documented fallback is:
a system message (FALLBACK_INSTRUCTIONS) lists the functions as JSON and asks for the format above;
an earlier assistant call is rendered as such a block in the assistant's text, and a tool result as a
user turn holding `<tool_response>...</tool_response>`.

tool_choice "required" or a named function constrains generation with a grammar: one call (or, with
parallel_tool_calls, several) whose name is one of the tools and whose arguments validate against
that tool's parameters. "auto" generates freely and parses whatever blocks the text holds; "none"
leaves the tools out of the prompt and returns text.
"""

from __future__ import annotations

import json
import re
import uuid

from keel.engine.guided import JSON_OPTIONS
from keel.server.body import depth_ok

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS = 8  # calls in one response when parallel_tool_calls is allowed
FALLBACK_INSTRUCTIONS = (
    "You can call functions. To call one, reply with only this, once per call:\n"
    f"{OPEN}\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n{CLOSE}\n"
    "The functions:\n")
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


def supports_tools(tokenizer) -> bool:
    return "tools" in (tokenizer.chat_template or "")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


MAX_ARGUMENTS_DEPTH = 32


def _arguments_object(arguments):
    # OpenAI clients send arguments as a JSON string; templates expect the object. A string that is
    # not JSON, or nests deeper than templates should walk, stays the string it was.
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            return arguments
        return parsed if depth_ok(parsed, MAX_ARGUMENTS_DEPTH) else arguments
    return arguments


def _block(call: dict) -> str:
    fn = call.get("function", {})
    body = {"name": fn.get("name"), "arguments": _arguments_object(fn.get("arguments", {}))}
    return f"{OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CLOSE}"


def prepare_messages(messages: list[dict], tools: list[dict] | None, native: bool) -> tuple[list[dict], list | None]:
    """The messages and the `tools` value for the chat template (see the module docstring)."""
    if native:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [{**c, "function": {**c.get("function", {}), "arguments": _arguments_object(
                    c.get("function", {}).get("arguments", {}))}} for c in m["tool_calls"]]}
            out.append(m)
        return out, tools or None
    out = []
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        out.append({"role": "system", "content": FALLBACK_INSTRUCTIONS + listing})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = "\n".join(_block(c) for c in m["tool_calls"])
            content = _text(m.get("content"))
            m = {"role": "assistant", "content": f"{content}\n{text}" if content else text}
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"}
        out.append(m)
    # two system messages confuse templates that special-case the first: merge into one
    if tools and len(out) > 1 and out[1]["role"] == "system":
        out[0:2] = [{"role": "system", "content": f"{_text(out[1]['content'])}\n\n{out[0]['content']}"}]
    return out, None


def _text(content) -> str:
    """Message content as text: a string, or text parts (the Agents SDK and LangChain send tool results
    as [{"type": "text", "text": ...}]) joined as the templates' own joining does."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """JSON Schema of one call: {"name": <a tool's name>, "arguments": <that tool's parameters>}.

    Each tool's parameters are a schema document of their own, whose local `$ref`s ("#/$defs/User",
    "#" for recursion) point into that document: what pydantic, the Agents SDK and instructor send for
    nested models. Embedded under "arguments" those pointers would resolve against the wrong root, so
    each parameters schema is placed whole under the root's $defs and its pointers are prefixed."""
    options, defs = [], {}
    for i, t in enumerate(tools):
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if _has_local_ref(params):
            key = f"tool{i}"
            defs[key] = _prefix_refs(params, f"#/$defs/{key}")
            params = {"$ref": f"#/$defs/{key}"}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "$defs": defs} if defs else schema


def _has_local_ref(node) -> bool:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if isinstance(n.get("$ref"), str) and n["$ref"].startswith("#"):
                return True
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return False


def _prefix_refs(node, prefix: str):
    """A copy of `node` with every local $ref ("#...") re-rooted at `prefix` ("#/$defs/tool0...")."""
    if isinstance(node, dict):
        return {k: (prefix + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else
                    _prefix_refs(v, prefix)) for k, v in node.items()}
    if isinstance(node, list):
        return [_prefix_refs(v, prefix) for v in node]
    return node


def call_grammar(tools: list[dict], name: str | None, parallel: bool, after_open: bool = False) -> str:
    """A Lark grammar (llguidance's dialect) for one or more call blocks and nothing else; after_open:
    for the text that follows a first OPEN the model wrote itself (tool_choice "auto")."""
    schema = json.dumps({**call_schema(tools, name), "x-guidance": JSON_OPTIONS})
    # parallel calls: at most MAX_CALLS, as a small model may otherwise repeat one call until max_tokens
    many = f' ("\\n" call){{0,{MAX_CALLS - 1}}}' if parallel and name is None else ""
    first = "rest" if after_open else "call"
    return (f'start: {first}{many}\ncall: "{OPEN}" rest\n'
            f'rest: "\\n" %json {schema} "\\n{CLOSE}"\n')


def call_or_answer_grammar(tools: list[dict], parallel: bool, answer_schema) -> str:
    """tools with response_format under tool_choice "auto": the output is either calls (as
    call_grammar) or an answer in the response format, decided by the model's first tokens."""
    if answer_schema is True or answer_schema is None:
        answer_schema = {}
    answer = json.dumps({**answer_schema, "x-guidance": JSON_OPTIONS})
    return call_grammar(tools, None, parallel).replace("start: ", "start: answer | ", 1) + f"answer: %json {answer}\n"


def parse_tool_calls(text: str, names: set[str], cut: bool = False) -> tuple[str | None, list[dict]]:
    """Split generated text into content and calls. A block that does not parse, or names a function
    that is not offered, stays in the content: the client sees what the model wrote. cut: the text
    ended at max_tokens, so an unclosed last block (or the start of one) is dropped, not kept as markup."""
    if cut:
        text = _without_open_block(text)
    calls, kept, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _call_from(m.group(1), names)
        if call is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return content or None, calls


def _without_open_block(text: str) -> str:
    last = text.rfind(OPEN)
    if last >= 0 and text.find(CLOSE, last) < 0:
        return text[:last]
    return text[:len(text) - _open_prefix_at_end(text)]


def _open_prefix_at_end(text: str, start: int = 0) -> int:
    """Length of the longest end of text[start:] that could be the start of OPEN (0: none)."""
    return next((k for k in range(min(len(OPEN) - 1, len(text) - start), 0, -1) if text.endswith(OPEN[:k])), 0)


def _call_from(body: str, names: set[str]) -> dict | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


class ToolCallStream:
    """Turns streamed text into chat deltas: content outside call blocks, and for each call first a
    delta with index, id, type and function.name (arguments ""), then only argument fragments.
    Text that may be the start of a block is held back until it is clearly not one."""

    _HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.buf = ""
        self.pos = 0  # buf[:pos] is handled
        self.in_call = False
        self.num_calls = 0
        self._args_start = self._args_sent = None  # in buf, while a call's header is out

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        out: list[dict] = []
        while True:
            if not self.in_call:
                i = self.buf.find(OPEN, self.pos)
                if i < 0:
                    hold = _open_prefix_at_end(self.buf, self.pos)
                    self._content(out, len(self.buf) - hold)
                    return out
                self._content(out, i, strip=True)
                self.pos, self.in_call = i + len(OPEN), True
            close = self.buf.find(CLOSE, self.pos)
            self._stream_call(out, close)
            if close < 0:
                return out
            self._end_call(out, close)
            self.pos, self.in_call = close + len(CLOSE), False

    def finish(self, cut: bool = False) -> list[dict]:
        """The rest, once the output ended; cut: it ended at max_tokens, so a call block still open (or
        the start of one) is dropped rather than sent as content markup."""
        out: list[dict] = []
        if self.in_call:
            if cut and self._args_start is None:
                self.in_call = False
            else:
                self._end_call(out, len(self.buf))
        else:
            end = len(self.buf)
            if cut:
                end -= _open_prefix_at_end(self.buf, self.pos)
            self._content(out, end)
        self.pos = len(self.buf)
        return out

    def _content(self, out: list[dict], end: int, strip: bool = False) -> None:
        text = self.buf[self.pos:end]
        if strip or self.num_calls:  # whitespace around blocks is layout, not content
            text = text.strip() and text
        if text:
            out.append({"content": text})
        self.pos = max(self.pos, end)

    def _stream_call(self, out: list[dict], close: int) -> None:
        end = close if close >= 0 else len(self.buf)
        if self._args_start is None:
            m = self._HEAD.match(self.buf, self.pos, end)
            if m is None or m.group(1) not in self.names or m.end() == end:
                # not yet readable as name-then-arguments (sent whole at the end), or the arguments
                # have not started: whitespace still to come belongs to no fragment
                return
            self._args_start = self._args_sent = m.end()
            out.append(self._call_delta(id=new_call_id(), type="function", function={"name": m.group(1), "arguments": ""}))
        stop = _value_end(self.buf, self._args_start, end)
        if stop > self._args_sent:
            out.append(self._call_delta(function={"arguments": self.buf[self._args_sent:stop]}))
            self._args_sent = stop

    def _end_call(self, out: list[dict], close: int) -> None:
        body = self.buf[self.pos:close]
        if self._args_start is not None:
            self.num_calls += 1
        else:
            call = _call_from(body.strip(), self.names)
            if call is None:  # not a call after all: the client gets the text
                out.append({"content": OPEN + self.buf[self.pos:close + len(CLOSE)]})
            else:
                out.append(self._call_delta(id=call["id"], type="function",
                                            function={"name": call["function"]["name"], "arguments": ""}))
                out.append(self._call_delta(function={"arguments": call["function"]["arguments"]}))
                self.num_calls += 1
        self._args_start = self._args_sent = None

    def _call_delta(self, **fields) -> dict:
        return {"tool_calls": [{"index": self.num_calls, **fields}]}


def _value_end(s: str, start: int, end: int) -> int:
    """Where the JSON value starting at s[start] ends (exclusive), or `end` if it has not ended yet."""
    depth, in_str, esc = 0, False, False
    for i in range(start, end):
        c = s[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth <= 0:
                return i + 1
        elif depth == 0 and c in ",}":
            return i
    return end
