"""Text <-> token ids, and chat templates, on top of the `tokenizers` library.

We deliberately do not depend on transformers here: a model folder's tokenizer.json holds the whole
tokenization pipeline, and tokenizer_config.json only adds the special-token names, the bos flag and
the chat template. Chat templates are rendered the way transformers renders them, so prompts match
what the model saw in training.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
import tokenizers

from keel.errors import InvalidRequestError, ModelLoadError


class Tokenizer:
    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: list[int],
        add_bos: bool = False,
    ):
        # Some tokenizer.json files ship with truncation or padding switched on (left over from
        # training); a server must never silently cut or pad a prompt.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos = add_bos and self.bos_token_id is not None
        added = tok.get_added_tokens_decoder()
        self.all_special_ids = sorted(i for i, t in added.items() if t.special)
        # Counted as max id + 1 rather than number of tokens, so every id the tokenizer can
        # produce is below it even if added tokens leave holes in the id space.
        self._vocab_size = max(
            tok.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1
        )
        self._compiled: tuple[jinja2.Template, bool] | None = None

    @classmethod
    def from_folder(cls, folder: str, generation_config: dict | None = None) -> "Tokenizer":
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelLoadError(f"no tokenizer.json in model folder {folder}")
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise ModelLoadError(f"could not read {path}: {e}") from e
        config = _read_json(folder, "tokenizer_config.json")
        if generation_config is None:
            generation_config = _read_json(folder, "generation_config.json")

        # Later sources win: tokenizer_config.json < chat_template.json < chat_template.jinja,
        # which is the order in which transformers moved templates out of tokenizer_config.
        template = _pick_template(config.get("chat_template"))
        template = _pick_template(_read_json(folder, "chat_template.json").get("chat_template")) or template
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()

        bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        eos_ids = generation_config.get("eos_token_id")
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        eos_id = tok.token_to_id(eos) if eos else None
        if eos_id is not None:
            eos_ids.append(eos_id)
        return cls(
            tok,
            chat_template=template,
            bos_token=bos,
            eos_token=eos,
            eos_token_ids=eos_ids,
            add_bos=bool(config.get("add_bos_token", False)),
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True, max_len: int | None = None) -> list[int]:
        """max_len: raise PromptTooLongError (with the count) rather than build a list of more ids
        than that: for a prompt that cannot fit, building the list alone would hold the GIL (and stall
        every other request) for as long as the prompt is big."""
        ids = self._encode_ids(text, add_special_tokens, max_len)
        bos = self.bos_token_id
        if add_special_tokens and bos is not None:
            # add_bos_token in tokenizer_config means "bos is expected"; the tokenizer.json
            # post-processor may or may not already add it, so add it only if it is missing.
            if self.add_bos and (not ids or ids[0] != bos):
                ids.insert(0, bos)
            # A prompt that already starts with the bos text would otherwise get two bos tokens,
            # which noticeably degrades some models (Llama family).
            if len(ids) >= 2 and ids[0] == ids[1] == bos and text.startswith(self.bos_token):
                del ids[0]
        return ids

    def _encode_ids(self, text: str, add_special_tokens: bool, max_len: int | None = None) -> list[int]:
        # encode_batch_fast releases the GIL while it works (encode holds it: 6 s of a frozen event
        # loop for a 5 MB prompt) and skips the character offsets nobody here reads, which also makes
        # freeing the result cheap. Same ids as encode.
        fast = getattr(self._tok, "encode_batch_fast", None)
        if fast is None:  # tokenizers < 0.20
            enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        else:
            enc = fast([text], add_special_tokens=add_special_tokens)[0]
        if max_len is not None and len(enc) > max_len:
            raise PromptTooLongError(len(enc), max_len)
        return enc.ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a rendered chat (no special tokens added) and each token's (start, end) characters in
        `text`, for telling which tokens came from which part of it (keel.finetune.data)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools=None, **kwargs
    ) -> str:
        template, wants_parts = self._template()
        messages = [_prepare_message(m, wants_parts) for m in messages]
        context = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v}
        context.update(kwargs)  # as in transformers, caller kwargs override the special tokens
        try:
            return template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **context
            )
        except InvalidRequestError:
            raise
        except Exception as e:  # the template is untrusted code; any failure is about this request
            raise InvalidRequestError(
                f"the chat template could not render these messages: {type(e).__name__}: {e}"
            ) from e

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools=None, max_len: int | None = None,
        **kwargs
    ) -> list[int]:
        """Render and tokenize a chat. The template writes every special token it wants
        (bos included), so the tokenizer must not add its own. max_len: see encode."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(text, add_special_tokens=False, max_len=max_len)

    def _template(self) -> tuple[jinja2.Template, bool]:
        if self._compiled is None:
            if not self.chat_template:
                raise InvalidRequestError(
                    "this model has no chat template, so chat requests are not supported; "
                    "use the completions endpoint with a plain prompt instead"
                )
            env = _jinja_env()
            try:
                ast = env.parse(self.chat_template)
                self._compiled = (env.from_string(ast), _iterates_over_content(ast))
            except jinja2.TemplateError as e:
                raise InvalidRequestError(f"this model's chat template is not valid Jinja: {e}") from e
        return self._compiled


class PromptTooLongError(InvalidRequestError):
    """A text tokenizes to more than the caller's max_len tokens."""

    def __init__(self, num_tokens: int, max_len: int) -> None:
        super().__init__(f"the prompt has {num_tokens} tokens, more than the {max_len} allowed")
        self.num_tokens = num_tokens


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object")
    return data


def _token_content(value) -> str | None:
    # Older tokenizer_config files store special tokens as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value) -> str | None:
    # Some models ship several named templates (e.g. "default", "tool_use", "rag").
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value or None


def _prepare_message(message: dict, wants_parts: bool) -> dict:
    if not isinstance(message, dict):
        raise InvalidRequestError(f"each chat message must be an object, got {message!r}")
    # Same as transformers: OpenAI clients send e.g. "content": null next to tool calls, and
    # templates handle a missing key far better than a None they would print as "None".
    message = {k: v for k, v in message.items() if v is not None}
    content = message.get("content")
    if isinstance(content, list) and not wants_parts:
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(f"only text content parts are supported, got {kind!r}")
            texts.append(part.get("text", ""))
        message["content"] = "\n".join(texts)
    return message


def _iterates_over_content(ast: nodes.Template) -> bool:
    """Whether the template loops over message content itself, i.e. expects a list of parts
    (`{% for part in message['content'] %}`); other templates get the parts joined into a string."""
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, nodes.Filter):  # e.g. message.content | selectattr(...)
            it = it.node
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) and it.arg.value == "content":
            return True
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return True
        if isinstance(it, nodes.Name) and it.name == "content":
            return True
    return False


class _GenerationTag(jinja2.ext.Extension):
    # Templates written for training mark assistant turns with {% generation %}; transformers
    # uses it to build loss masks. For inference it only has to render its body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise InvalidRequestError(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # Chat templates come from model repositories, i.e. untrusted code: always sandboxed.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
