"""The Responses API's request and items, translated to and from what the chat path runs.

A Responses request becomes a chat request (ChatCompletionRequest) that the engine runs as any other:
`instructions` a system message; input items messages (text parts joined), `function_call` items an
assistant message with tool_calls, `function_call_output` items tool messages; flat function tools
({"type": "function", "name", "parameters"}) chat tools; `text.format` a response_format;
`max_output_tokens` max_completion_tokens. The generated text comes back as output items: a
`message` with one `output_text` part and/or `function_call` items.

What keel cannot do is a 400 naming it: built-in tools (web search, file search, computer use, code
interpreter, MCP, image generation), background mode, conversations, prompt templates.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field, model_validator

from keel.server.protocol import ChatCompletionRequest, RequestError, _HostedOnly

HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview", "computer_use",
                "code_interpreter", "mcp", "image_generation", "local_shell", "shell", "apply_patch", "custom")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesRequest(_HostedOnly):
    model: str
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = None  # keel extension, as in chat
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    store: bool | None = True
    previous_response_id: str | None = Field(None, max_length=200)
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: int | None = Field(None, ge=1)
    reasoning: Any = None  # accepted and ignored: keel's models have no reasoning settings

    @model_validator(mode="after")
    def _unsupported(self):
        if self.background:
            raise RequestError("background mode is not supported: keel answers while the request is open",
                               "background", "unsupported_parameter")
        for name in ("conversation", "prompt"):
            if getattr(self, name) is not None:
                raise RequestError(f"{name} is not supported yet by this server; send input (and "
                                   f"previous_response_id) instead", name, "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        return self


def _text_of(content, where: str) -> str:
    """A message's content as text: a string, or input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.content[{j}] has type {kind!r}; only text parts (input_text, "
                               f"output_text) are supported", f"{where}.content[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def input_messages(items: str | list[dict]) -> tuple[list[dict], list[dict]]:
    """(chat messages, input items with ids) for a request's `input`."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    messages, stored = [], []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{where}.role must be user, system, developer or assistant", f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
            stored.append({"id": item.get("id") or new_id("msg"), "type": "message", "role": role,
                           "status": "completed", "content": _parts(item.get("content"), role)})
        elif kind == "function_call":
            call = _call_fields(item, where)
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            stored.append({"id": item.get("id") or new_id("fc"), "type": "function_call", "status": "completed",
                           "call_id": call["id"], "name": call["function"]["name"],
                           "arguments": call["function"]["arguments"]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise RequestError(f"{where}.call_id is required", f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, where)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
            stored.append({"id": item.get("id") or new_id("fco"), "type": "function_call_output",
                           "call_id": item["call_id"], "output": output, "status": "completed"})
        else:
            raise RequestError(f"{where} has type {kind!r}; keel takes message, function_call and "
                               f"function_call_output items", f"{where}.type", "unsupported_parameter")
    return messages, stored


def _parts(content, role: str) -> list[dict]:
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        return [{"type": kind, "text": content}]
    return [{"type": p.get("type", kind), "text": p.get("text", "")} for p in content or []]


def _call_fields(item: dict, where: str) -> dict:
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise RequestError(f"{where}.{key} must be a string", f"{where}.{key}")
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            hosted = kind in HOSTED_TOOLS or (isinstance(kind, str) and kind.startswith(HOSTED_TOOLS))
            what = f"the built-in tool {kind!r} is not supported: keel runs function tools only" if hosted else \
                f"tools[{i}] has type {kind!r}; only function tools are supported"
            raise RequestError(what, f"tools[{i}].type", "unsupported_parameter")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise RequestError(f"tool_choice {choice!r} is not supported: use none, auto, required or "
                       f"{{\"type\": \"function\", \"name\": ...}}", "tool_choice", "unsupported_parameter")


def chat_format(text: dict | None):
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        spec.setdefault("name", "response")
        return {"type": "json_schema", "json_schema": spec}
    raise RequestError(f"text.format type {fmt.get('type')!r} is not supported", "text.format")


def chat_request(body: ResponsesRequest, history: list[dict]) -> tuple[ChatCompletionRequest, list[dict], list[dict]]:
    """The chat request that runs `body` after the stored conversation `history`, the input items (to
    store), and the new chat messages (the conversation grows by them; instructions are not carried)."""
    messages, stored = input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    chat = {"model": body.model, "messages": system + history + messages, "tools": chat_tools(body.tools),
            "tool_choice": chat_tool_choice(body.tool_choice), "parallel_tool_calls": body.parallel_tool_calls,
            "response_format": chat_format(body.text), "max_completion_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
    if body.top_logprobs is not None:
        chat.update(logprobs=True, top_logprobs=body.top_logprobs)
    chat = {k: v for k, v in chat.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate(chat), stored, messages
    except ValueError as e:  # pydantic's ValidationError: a message the client's items produced
        raise RequestError(f"the input cannot be run: {str(e).splitlines()[-1].strip()}", "input") from None


def output_items(content: str | None, calls: list[dict], status: str) -> list[dict]:
    items = []
    if content:
        items.append(message_item(new_id("msg"), content, status))
    for c in calls:
        items.append(call_item(new_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"], "completed"))
    return items


def message_item(item_id: str, text: str, status: str, logprobs: list | None = None) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def history_after(conversation: list[dict], output: list[dict]) -> list[dict]:
    """The chat messages a later request continues from: `conversation` plus this response's output."""
    out = list(conversation)
    for item in output:
        if item["type"] == "message":
            out.append({"role": "assistant", "content": item["content"][0]["text"]})
        else:
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return out
