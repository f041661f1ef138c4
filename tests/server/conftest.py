"""Server fixtures: a tiny random Llama checkpoint served in-process by uvicorn on a free loopback
port, OpenAI clients pointed at it, and validators for the response schemas of OpenAI's spec.

The checkpoint's tokenizer is WordLevel over "t0".."t255" (eos id 1, unknown words -> t0), so
prompts are written as "t10 t11 ..." and outputs read like "t219 t75 ...".
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import uvicorn

from keel.config import CacheConfig, SchedulerConfig
from keel.engine.llm_engine import LLMEngine
from keel.server import create_app
from tests.models.conftest import make_checkpoint

MODEL = "tiny-llama"
# A ChatML-like template over the checkpoint's own tokens: t2/t3/t4/t5 open a system/user/assistant/
# tool turn, t6 closes it.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 't2', 'user': 't3', 'assistant': 't4', 'tool': 't5'}[m['role']] }} "
    "{{ m['content'] }} t6 {% endfor %}{% if add_generation_prompt %}t4 {% endif %}"
)
# OpenAI's spec (MIT, its LICENSE and provenance beside it), kept in the repo so a clone alone runs the suite
SPEC_PATH = Path(__file__).resolve().parents[1] / "data/openai-openapi/openapi.json"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("server_ckpt") / MODEL)
    make_checkpoint(folder, "llama-gqa")
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config))
    return folder


def tiny_engine(folder: str, **scheduler) -> LLMEngine:
    return LLMEngine(folder, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=1024),
                     scheduler=SchedulerConfig(**scheduler))


class LiveServer:
    """Runs an app on uvicorn in a background thread, on a port the OS picked on 127.0.0.1."""

    def __init__(self, app, **config) -> None:
        """config: more uvicorn.Config settings (keel.server.limits.uvicorn_settings, say)."""
        self.app = app
        self.state = getattr(app.state, "keel", None)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                         if line and not line.startswith("#"))}

    def wait_idle(self, timeout: float = 15) -> dict[str, float]:
        """Polls /metrics until nothing runs or waits and no KV block is held; returns the last sample."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["keel_requests_running"] == m["keel_requests_waiting"] == m["keel_kv_cache_usage_ratio"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not become idle: {m}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def server(tiny_ckpt):
    app = create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL)
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return server.client()


# -- OpenAI's schemas ----------------------------------------------------------------------------
def _rewrite_nullable(node):
    """OpenAPI 3.0's `nullable: true` into JSON Schema type unions (3.1 validators ignore the keyword)."""
    if isinstance(node, list):
        return [_rewrite_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _rewrite_nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            node["type"] = [*types, "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


class Schemas:
    def __init__(self, spec: dict) -> None:
        self.components = _rewrite_nullable(spec["components"])
        # OpenAI streams legacy completions with finish_reason null until each choice's last chunk
        # (and usage null with include_usage), but the spec shares one schema, where neither may be
        # null, between chunks and responses.
        stream = json.loads(json.dumps(self.components["schemas"]["CreateCompletionResponse"]))
        reason = stream["properties"]["choices"]["items"]["properties"]["finish_reason"]
        reason["type"], reason["enum"] = ["string", "null"], [*reason["enum"], None]
        stream["properties"]["usage"] = {"anyOf": [stream["properties"]["usage"], {"type": "null"}]}
        self.components["schemas"]["CompletionStreamChunk"] = stream

    def validate(self, name: str, instance) -> None:
        schema = {"components": self.components, "$ref": f"#/components/schemas/{name}"}
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(instance))
        if error is not None:  # the default message prints the whole schema
            raise AssertionError(f"not a valid {name} at {list(error.absolute_path)}: {error.message}")


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    if not SPEC_PATH.is_file():
        pytest.fail(f"OpenAI's OpenAPI spec is missing: expected it at {SPEC_PATH}")
    return Schemas(json.loads(SPEC_PATH.read_text()))


def chat_body(content: str = "t10 t11 t12", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **kw}


def sse_events(raw: str) -> list[str]:
    """The data payloads of a raw SSE body, checking the framing on the way."""
    assert raw.endswith("\n\n"), raw[-50:]
    events = raw[:-2].split("\n\n")
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, e
    return [e[len("data: "):] for e in events]
