"""What `keel eval` compares: a local model (served in-process over the same OpenAI API) or any
OpenAI-compatible URL. Both are asked through one client with one set of request fields, so a local
model, a second `keel serve` and a hosted API are measured the same way.

Target strings: a URL (`http://host:8000/v1`; the model is `--a-model`/`--b-model`, else the first one
the endpoint lists; the key is $KEEL_EVAL_API_KEY, else $OPENAI_API_KEY), or a local model as `keel
serve` takes it (a folder, a GGUF file, a stored name, a hub id, or `builtin`), with `--a-quantize`/
`--b-quantize`, or a keel.lock file: its model loaded as the lock says, refused unless every file matches.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

from keel.errors import KeelError


@dataclass
class Answer:
    text: str
    tool_calls: list[dict]  # [{"name", "arguments"}] with arguments as the model wrote them
    finish_reason: str | None
    latency: float
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Target:
    """An OpenAI-compatible endpoint and the model asked there."""

    def __init__(self, spec: str, model: str | None = None, quantize: str | None = None) -> None:
        self.spec, self.quantize = spec, quantize
        self._server = None
        if spec.startswith(("http://", "https://")):
            self.url, self.local = spec.rstrip("/"), False
        else:
            self.url, self.local = None, True
        self.lock = spec if spec.endswith(".lock") else None
        self.model = model

    def describe(self) -> str:
        q = f", quantization {self.quantize}" if self.quantize else ""
        return f"{self.spec} (model {self.model}{q})" if self.model else f"{self.spec}{q}"

    def key(self) -> str:
        """What identifies the answers' source, for resuming into the same output folder."""
        return f"{self.spec}|{self.model}|{self.quantize}"

    def __enter__(self) -> "Target":
        if self.lock:
            self._server = _InProcessServer.from_lock(self.lock)
            self.url = self._server.url
        elif self.local:
            self._server = _InProcessServer(None if self.spec == "builtin" else self.spec, self.quantize)
            self.url = self._server.url
        import openai
        key = os.environ.get("KEEL_EVAL_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=2, timeout=600)
        if self.model is None:
            try:
                self.model = self.client.models.list().data[0].id
            except Exception as e:  # connection refused, auth, no models: all mean this target is unusable
                self.__exit__()
                raise KeelError(f"target {self.spec}: cannot list its models ({type(e).__name__}: {e}); "
                                f"name one with --a-model / --b-model") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def ask(self, body: dict) -> Answer:
        start = time.monotonic()
        try:
            r = self.client.chat.completions.create(model=self.model, **body)
        except Exception as e:  # an error is an answer too: it is counted and shown, the run goes on
            return Answer("", [], None, time.monotonic() - start, 0, 0, error=f"{type(e).__name__}: {e}")
        choice = r.choices[0]
        calls = [{"name": c.function.name, "arguments": c.function.arguments}
                 for c in (choice.message.tool_calls or []) if c.type == "function"]
        usage = r.usage
        return Answer(choice.message.content or "", calls, choice.finish_reason, time.monotonic() - start,
                      usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)


class _InProcessServer:
    """A local model behind keel's own server on a loopback port, for the duration of one target."""

    def __init__(self, model: str | None, quantize=None, engine=None) -> None:
        import uvicorn

        from keel.engine.llm_engine import LLMEngine
        from keel.models.loader import DEFAULT_MODEL_NAME
        from keel.server import create_app
        engine = engine or LLMEngine(model, quantization=quantize)
        name = DEFAULT_MODEL_NAME if model is None else engine.model_name
        app = create_app(engine, served_model_name=name, default_max_tokens=None)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise KeelError(f"the local target {model or 'builtin'} did not start serving")
            time.sleep(0.02)

    @classmethod
    def from_lock(cls, path: str) -> "_InProcessServer":
        """The model a keel.lock pins, loaded as it says; KeelError naming any file that differs."""
        from keel.engine.llm_engine import LLMEngine
        from keel.quant.config import QuantConfig
        from keel.registry.lock import build, differences, read
        record = read(path)
        load = record.get("load") or {}
        quant = load.get("quantization")
        engine = LLMEngine(record["model"]["path"], dtype=load.get("dtype"), weight_dtype=load.get("weight_dtype", "auto"),
                           quantization=QuantConfig(**quant) if quant else "none")
        diffs = differences({**record, "adapters": {}}, build(engine))  # the base model is asked, not adapters
        if diffs:
            raise KeelError(f"the model differs from {path}: " + "; ".join(diffs[:5]))
        return cls(record["model"]["path"], engine=engine)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
