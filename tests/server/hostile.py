"""Shared by the hostile-input tests: a server with every route on (chat, completions, embeddings,
LoRA loading), small limits so that tests can reach them, and checks that an answer is a 4xx in
OpenAI's shape and that the server is still whole afterwards."""

from __future__ import annotations

import json

import httpx

from keel.config import CacheConfig
from keel.embed import EmbeddingModel
from keel.engine.llm_engine import LLMEngine
from keel.server import create_app
from keel.server.adapters import LoRAPolicy
from keel.server.limits import ServerLimits, uvicorn_settings
from tests.embed.conftest import BUILTIN, make_tiny_bert
from tests.server.conftest import MODEL, LiveServer, chat_body

EMB = "tiny-bert"
LIMITS = dict(max_request_bytes=8 * 2**20, body_timeout_s=1.5, header_timeout_s=1.0, max_embedding_inputs=64)


def hostile_server(tiny_ckpt: str, tmp, **kw) -> LiveServer:
    """The tiny Llama (LoRA on, adapters loadable from `tmp/adapters` only) and, when the built-in
    embedding model's tokenizer is installed, a tiny BERT for embeddings."""
    engine = LLMEngine(tiny_ckpt, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=1024), enable_lora=True)
    embedder = None
    if BUILTIN is not None:
        embedder = EmbeddingModel(make_tiny_bert(str(tmp / EMB), {"mean_tokens": True}, True))
    (tmp / "adapters").mkdir(exist_ok=True)
    limits = ServerLimits(**{**LIMITS, **kw.pop("limits", {})})
    app = create_app(engine, served_model_name=MODEL, embedding_model=embedder, limits=limits,
                     lora_policy=LoRAPolicy(roots=[str(tmp / "adapters")]), **kw)
    return LiveServer(app, **uvicorn_settings(limits))


def check_4xx(r: httpx.Response, status: int | None = None, param: str | None = None, code: str | None = None) -> dict:
    """A 4xx with OpenAI's error object (and the given status, param and code); returns the error."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert isinstance(err["code"], str) and "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def check_whole(server: LiveServer, http: httpx.Client | None = None) -> None:
    """/health is 200, a chat request is answered, /v1/models lists, and the engine loop never died."""
    own = http is None
    http = http or server.http()
    try:
        assert http.get("/health").status_code == 200
        r = http.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        assert http.get("/v1/models").status_code == 200
        assert server.state.client.dead is None
    finally:
        if own:
            http.close()


def raw_post(http: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST `text` exactly as written (json.dumps escapes a lone surrogate as \\ud800, which is the point)."""
    return http.post(path, content=text.encode("utf-8"), headers={"content-type": "application/json"})


def dumps(obj) -> str:
    return json.dumps(obj)  # ensure_ascii: lone surrogates travel as JSON escapes
