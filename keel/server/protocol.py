"""Request bodies of the OpenAI endpoints, validated with pydantic, and their mapping to SamplingParams.

Every model forbids unknown fields: a typo such as `temprature` is a 400 naming the field rather than
a request that silently runs with the default. Fields that only make sense on a hosted service are
declared, accepted and ignored (see HOSTED_ONLY_FIELDS); fields we cannot honour yet are declared
and rejected with a message saying so, so the error names the feature rather than "unknown field".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from keel.errors import InvalidRequestError
from keel.sampling_params import SamplingParams

# Accepted and ignored: they steer storage, billing, routing or hosted tools that a self-hosted
# server does not have, and ignoring them does not change the tokens a request gets back.
HOSTED_ONLY_FIELDS = (
    "store", "metadata", "service_tier", "prediction", "reasoning_effort",
    "web_search_options", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
    "safety_identifier", "verbosity", "moderation", "user",
)


# Bounds on what every engine step pays for, per request (see _SamplingFields' validators).
MAX_STOP_CHARS = 1024
MAX_TOKEN_LIST = 1024


class RequestError(ValueError):
    """A request that parsed but cannot be served as asked; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Fields every generation endpoint accepts and ignores, declared from HOSTED_ONLY_FIELDS alone (and
# documented in keel/server/__init__.py, which a test holds to this tuple).
_HostedOnly = create_model("_HostedOnly", __base__=_Strict, **{name: (Any, None) for name in HOSTED_ONLY_FIELDS})


class StreamOptions(_Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # we never add obfuscation padding; accepted for clients that send it


class _SamplingFields(_HostedOnly):
    """Fields shared by chat and completions. Ranges follow the OpenAI reference where it has one."""
    model: str
    n: int | None = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions, same names and meanings
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(v)}")
        # each step looks for every stop string at the end of the text: bounded, so one request cannot
        # make every step of the batch slow
        if any(len(s) > MAX_STOP_CHARS for s in ([v] if isinstance(v, str) else v or []) if isinstance(s, str)):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v):
        if v is not None and len(v) > MAX_TOKEN_LIST:
            raise ValueError(f"at most {MAX_TOKEN_LIST} stop token ids are allowed, got {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v):
        if v is not None and len(v) > MAX_TOKEN_LIST:
            raise ValueError(f"at most {MAX_TOKEN_LIST} tokens can be biased, got {len(v)}")
        for key, bias in (v or {}).items():
            try:
                int(key)
            except ValueError:
                raise ValueError(f"keys must be token ids written as strings, got {key!r}") from None
            if not -100 <= bias <= 100:
                raise ValueError(f"bias {bias} for token {key} is outside [-100, 100]")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        kw: dict[str, Any] = dict(
            n=self.n or 1, max_tokens=max_tokens, logprobs=logprobs, seed=self.seed, stop=self.stop,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            ignore_eos=bool(self.ignore_eos), min_tokens=self.min_tokens or 0,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            skip_special_tokens=self.skip_special_tokens is not False)
        # null means "the default", as in OpenAI's API; only pass what the client set
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        try:
            return SamplingParams(**kw)
        except InvalidRequestError as e:
            # SamplingParams names the field first ("top_p=0 is invalid: ..."); map it back to ours
            name = str(e).split("=", 1)[0]
            raise RequestError(str(e), self._field_for(name)) from None

    def _field_for(self, sampling_name: str) -> str | None:
        return sampling_name if sampling_name in type(self).model_fields else None


# -- chat ----------------------------------------------------------------------------------------
class JSONSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # we always enforce the schema, strict or not


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise RequestError("json_schema is required with type 'json_schema' and not allowed otherwise",
                               "response_format.json_schema")
        return self


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments are enforced under tool_choice required/named, strict or not


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _FunctionName


class CalledFunction(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI clients send a JSON string; some send the object


class ToolCallIn(_Strict):
    """An earlier call, sent back in an assistant message."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction
    index: int | None = None  # kept by clients that rebuild calls from streamed deltas


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # a string or a list of text parts; checked below for a clearer message than a union's
    name: str | None = None
    tool_call_id: str | None = None  # role "tool"
    tool_calls: list[ToolCallIn] | None = None  # role "assistant": earlier calls, rendered by the template
    refusal: str | None = None  # role "assistant": a refusal echoed back by the client; not shown to the model

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v):
        if v is not None and not isinstance(v, (str, list)):
            raise ValueError("content must be a string or a list of text parts")
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts are supported")
                if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise ValueError(f"content part {i} must be {{'type': 'text', 'text': <string>}}")
        return v

    @model_validator(mode="after")
    def _role_rules(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role!r} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs tool_call_id")
        return self

    def for_template(self) -> dict:
        msg = self.model_dump(exclude_none=True, exclude={"refusal"})
        # Chat templates predate the developer role; it means what system meant for older models.
        if msg["role"] == "developer":
            msg["role"] = "system"
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None

    @model_validator(mode="after")
    def _unsupported(self):
        later = "is not supported yet by this server"
        if self.functions or self.function_call is not None:
            raise RequestError(f"the deprecated functions and function_call {later}; use tools and tool_choice",
                               "functions" if self.functions else "function_call", "unsupported_parameter")
        self._check_tools()
        # Ignoring these would silently return text to a client that asked for audio.
        if self.audio is not None or any(m != "text" for m in self.modalities or []):
            raise RequestError("audio output is not supported: this server generates text only",
                               "modalities" if self.audio is None else "audio", "unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs to be true", "top_logprobs")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise RequestError("max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
                               "max_tokens")
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        params = super().sampling_params(max_tokens, logprobs)
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            params.json_object = True
        elif fmt is not None and fmt.type == "json_schema":
            # no schema: any JSON value, as the name alone constrains nothing
            params.json_schema = {} if fmt.json_schema.schema_ is None else fmt.json_schema.schema_
        return params

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise RequestError("tools must have distinct function names", "tools")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise RequestError("tool_choice needs tools", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise RequestError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not in tools",
                               "tool_choice")
        if self.tool_mode in ("required", "named") and self.response_format is not None \
                and self.response_format.type != "text":
            raise RequestError("response_format cannot be combined with a tool_choice that forces a call",
                               "response_format")

    @property
    def tool_mode(self) -> str:
        """"none" (no tools or tool_choice none), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _field_for(self, sampling_name: str) -> str | None:
        if sampling_name == "max_tokens":
            return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if sampling_name == "logprobs":
            return "top_logprobs"
        return super()._field_for(sampling_name)


# -- completions ---------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: Any  # a string, a list of strings, token ids, or a list of token-id lists; see _check_prompt
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        def ids(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        ok = isinstance(v, str) or (isinstance(v, list) and v and (
            ids(v) or all(isinstance(p, str) for p in v) or all(ids(p) for p in v)))
        if not ok:
            raise ValueError("prompt must be a non-empty string, list of strings, list of token ids, "
                             "or list of token-id lists")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix is not None:
            raise RequestError("suffix (insertion) is not supported: keel models complete text left to right",
                               "suffix", "unsupported_parameter")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestError(f"best_of={self.best_of} is not supported; only best_of equal to n ({self.n or 1})",
                               "best_of", "unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise RequestError("echo together with logprobs is not supported yet: the engine does not compute "
                               "log-probabilities of prompt tokens", "echo", "unsupported_parameter")
        if isinstance(self.prompt, list) and any(p in ("", []) for p in self.prompt):
            raise RequestError("prompt must not hold empty prompts", "prompt")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)
