"""POST /v1/embeddings, served by the embedding model loaded beside the chat model.

Choices where OpenAI's API is silent or does not apply:
- `input` token ids are used as given (no [CLS]/[SEP] added): the caller tokenized for this model;
- text longer than the model's limit is a 400 naming both lengths, unless the request sets the keel
  extension `"truncation": true`, which keeps the first tokens (as sentence-transformers does);
- `dimensions` shortens (first components, renormalised) only models trained for it (a
  `matryoshka_dimensions` entry in their config); for others a value other than the full size is a 400;
- the forward passes run on one worker thread of their own, never on the event loop, and stop
  (between batches) when the client goes away;
- at most `--max-embedding-inputs` inputs (2048, OpenAI's limit) per request.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field, StrictInt, StrictStr

from keel.embed import EmbeddingModel
from keel.server.body import documented
from keel.server.errors import APIError, model_not_found
from keel.server.protocol import _Strict
from keel.server.streaming import unless_disconnected
from keel.server.common import get_state, key_of, read_body

router = APIRouter()


class EmbeddingRequest(_Strict):
    model: str
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None  # accepted and ignored, as on the other endpoints
    truncation: bool = False  # keel extension: cut inputs over the model's limit instead of a 400


class EmbeddingService:
    """The model and the one thread its forward passes run on."""

    def __init__(self, model: EmbeddingModel, created: int | None = None, max_inputs: int = 2048) -> None:
        self.model = model
        self.created = created if created is not None else int(time.time())
        self.max_inputs = max_inputs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-embed")

    def card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "keel",
                "root": self.model.name, "parent": None, "max_model_len": self.model.max_len,
                "dimensions": self.model.dimensions}

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def raw_inputs(body: EmbeddingRequest, max_inputs: int) -> list[str | list[int]]:
    """The request's inputs as a list, each a string or a token list; a 400 for none or too many."""
    raw = body.input
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise APIError(400, "'input' is an empty list; send at least one string or token list.", param="input")
    if isinstance(raw[0], int):
        raw = [raw]
    if len(raw) > max_inputs:
        raise APIError(400, f"'input' holds {len(raw)} inputs; this server takes at most {max_inputs} in one "
                            f"request. Split them over several requests.", param="input")
    return raw


def token_lists(body: EmbeddingRequest, model: EmbeddingModel, raw: list,
                cancel: threading.Event | None = None) -> list[list[int]]:
    """The request's inputs as token lists within the model's limit, or a 400 naming the problem."""
    out = []
    for i, item in enumerate(raw):
        if cancel is not None and cancel.is_set():
            return []
        where = "input" if len(raw) == 1 else f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"'{where}' is an empty string; embeddings need some text.", param="input")
            ids = model.encode(item)
        else:
            if not item:
                raise APIError(400, f"'{where}' is an empty token list.", param="input")
            ids = list(item)
            try:
                model.check_ids(ids, where)
            except ValueError as e:
                raise APIError(400, str(e), param="input") from None
        if len(ids) > model.max_len:
            if not body.truncation:
                raise APIError(400, f"'{where}' is {len(ids)} tokens long, over this model's maximum of "
                                    f"{model.max_len} tokens. Shorten it, or send \"truncation\": true to embed "
                                    f"its first {model.max_len} tokens.", code="context_length_exceeded",
                               param="input")
            ids = ids[:model.max_len]
        out.append(ids)
    return out


def _encode(vec: torch.Tensor, fmt: str):
    if fmt == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode("ascii")
    return vec.tolist()


@router.post("/embeddings", openapi_extra=documented(EmbeddingRequest))
async def create_embeddings(request: Request):
    body = await read_body(request, EmbeddingRequest)
    state = get_state(request)
    service: EmbeddingService | None = state.embeddings
    key = key_of(request)
    if key is not None and not key.allows(body.model):
        raise model_not_found(body.model)
    if service is None or body.model != service.model.name:
        if body.model == state.served_model_name or state.is_adapter(body.model):
            hint = f" This server's embedding model is `{service.model.name}`." if service else \
                " This server serves no embedding model."
            raise APIError(400, f"`{body.model}` is a chat model and does not produce embeddings.{hint}",
                           code="model_not_supported", param="model")
        raise model_not_found(body.model)
    model = service.model
    dims = body.dimensions
    if dims is not None and dims != model.dimensions:
        if not model.shortenable:
            raise APIError(400, f"`{model.name}` gives {model.dimensions}-dimensional embeddings and was not "
                                f"trained to be shortened; 'dimensions' must be {model.dimensions} or left out.",
                           param="dimensions")
        if dims > model.dimensions:
            raise APIError(400, f"'dimensions' is {dims}, over the model's {model.dimensions}.", param="dimensions")
    raw = raw_inputs(body, service.max_inputs)
    cancel = threading.Event()  # set when the client leaves: the worker stops between batches
    try:
        inputs = await unless_disconnected(request, service.run(token_lists, body, model, raw, cancel))
        vectors = await unless_disconnected(request, service.run(model.embed, inputs, dims, cancel))
    finally:
        cancel.set()
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    tokens = sum(len(x) for x in inputs)
    return JSONResponse({"object": "list", "data": data, "model": model.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
