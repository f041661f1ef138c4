"""Training data: the chat-format JSONL OpenAI's fine-tuning takes, checked on upload and turned into
token ids with a mask of the tokens the loss is computed on.

A line is `{"messages": [...], "tools": [...]?, "parallel_tool_calls": ...?}`; messages have a `role`
(system, developer, user, assistant, tool), text `content` (a string or text parts), and assistant
messages may carry `tool_calls` and OpenAI's `weight` (0: shown as context, not learned). The loss
covers the assistant turns only, as the model's chat template writes them (the closing token
included, so the model learns to stop).
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.errors import InvalidRequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_LINE_ERRORS = 1  # the first bad line is named; a user fixes one and uploads again


class DataError(InvalidRequestError):
    """A training file is not usable; the message names the line (1-based) and the problem."""


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise DataError(f"{where}.content[{i}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                                f"(images and audio are not supported for fine-tuning)")
            parts.append(p["text"])
        return "".join(parts)
    raise DataError(f"{where}.content must be a string or a list of text parts")


def check_example(obj, line: int) -> dict:
    """One chat-format training example, normalised (content as text); DataError naming the line."""
    where = f"line {line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object with a `messages` list")
    unknown = set(obj) - {"messages", "tools", "parallel_tool_calls", "functions"}
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(sorted(map(repr, unknown)))}; a chat-format line "
                        f"has `messages` and optionally `tools`")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list")
    out, learned = [], 0
    for i, m in enumerate(messages):
        w = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{w} must be an object with `role` and `content`")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{w}.role is {role!r}; use one of {', '.join(ROLES)}")
        msg = {"role": role, "content": _text(m.get("content"), w)}
        if role == "assistant":
            weight = m.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                raise DataError(f"{w}.weight must be 0 or 1")
            msg["weight"] = weight
            learned += weight
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                          for c in calls):
                    raise DataError(f"{w}.tool_calls must be a list of {{\"type\": \"function\", \"function\": ...}}")
                msg["tool_calls"] = calls
            if not msg["content"] and not calls:
                raise DataError(f"{w} has neither content nor tool_calls")
        elif not msg["content"] and role != "tool":
            raise DataError(f"{w}.content is empty")
        if role == "tool" and "tool_call_id" in m:
            msg["tool_call_id"] = m["tool_call_id"]
        if "name" in m:
            msg["name"] = m["name"]
        out.append(msg)
    if learned == 0:
        raise DataError(f"{where}: no assistant message to learn from (each example needs at least one "
                        f"assistant message with weight 1)")
    tools = obj.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: `tools` must be a list of tool objects")
    return {"messages": out, "tools": tools}


def _check_batch_line(obj, line: int) -> None:
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or not isinstance(obj.get("body"), dict):
        raise DataError(f"line {line}: a batch input line needs `custom_id` (string), `method`, `url` and `body` (object)")
    if obj.get("method") != "POST" or not isinstance(obj.get("url"), str):
        raise DataError(f"line {line}: `method` must be \"POST\" and `url` an endpoint such as /v1/chat/completions")


def parse_jsonl(data: bytes, purpose: str) -> list:
    """The records of an uploaded JSONL file, each checked for `purpose`; DataError naming the first
    bad line. Blank lines are skipped (many editors leave one at the end)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"the file is not UTF-8 text (byte {e.start}): upload JSONL, one JSON object per line") from None
    from keel.jsonl import records as jsonl_records
    records = []
    for n, obj in jsonl_records(text, error=DataError):
        if purpose == "fine-tune":
            records.append(check_example(obj, n))
        else:
            _check_batch_line(obj, n)
            records.append(obj)
    if not records:
        raise DataError("the file has no records: upload JSONL, one JSON object per line")
    return records


@dataclass
class Example:
    ids: list[int]
    labels: list[bool]  # True where the loss is computed (the token is predicted from the ones before)

    @property
    def trained_tokens(self) -> int:
        return sum(self.labels)


def tokenize(example: dict, tokenizer, max_len: int, line: int) -> Example:
    """Render the conversation with the model's chat template and mark the tokens of each assistant turn
    of weight 1. A turn's text is what rendering the conversation up to it adds after the prompt that
    asks for it (add_generation_prompt); that needs a template whose renders of a conversation's
    prefixes are prefixes of its render, as chat templates are (one that is not is named). Longer
    examples are cut at max_len tokens, as OpenAI does."""
    messages, tools = example["messages"], example.get("tools")
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    full = tokenizer.apply_chat_template(plain, add_generation_prompt=False, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("weight", 1):
            continue
        before = tokenizer.apply_chat_template(plain[:i], add_generation_prompt=True, tools=tools) if i else ""
        upto = tokenizer.apply_chat_template(plain[:i + 1], add_generation_prompt=False, tools=tools)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError(f"line {line}: this model's chat template does not render the conversation's turns as "
                            f"prefixes of the whole, so the assistant's tokens cannot be told apart")
        spans.append((len(before), len(upto)))
    ids, offsets = tokenizer.encode_with_offsets(full)
    labels = [any(a <= s < b for a, b in spans) for s, _ in offsets]
    ids, labels = ids[:max_len], labels[:max_len]
    labels[0] = False  # the first token has nothing before it to be predicted from
    if not any(labels):
        raise DataError(f"line {line}: no assistant token is left within the first {max_len} tokens")
    return Example(ids, labels)


def examples(records: list[dict], tokenizer, max_len: int) -> list[Example]:
    """Every checked record of a training file tokenized (DataError naming the first that cannot be)."""
    return [tokenize(r, tokenizer, max_len, i + 1) for i, r in enumerate(records)]


def read_examples(path: str, tokenizer, max_len: int) -> list[Example]:
    """A chat JSONL file on disk, checked and tokenized."""
    with open(path, "rb") as f:
        return examples(parse_jsonl(f.read(), "fine-tune"), tokenizer, max_len)
