"""The FastAPI app: one AsyncEngine behind the OpenAI endpoints, plus /health and /metrics.

`create_app` takes an already loaded engine, so the CLI, tests and (later) the gateway each decide how
the model is loaded and how the app is run.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

import keel
from keel.engine.async_engine import AsyncEngine
from keel.engine.llm_engine import LLMEngine
from keel.outputs import RequestOutput
from keel.sampling_params import SamplingParams
from keel.embed import EmbeddingModel
from keel.server import adapters, chat, completions, embeddings, errors, files, pages, responses
from keel.server import fine_tuning as ft_routes
from keel.server.embeddings import EmbeddingService
from keel.registry.lock import adapter_fingerprint
from keel.server.adapters import LoRAPolicy, adapter_cards
from keel.gateway import guardrails
from keel.gateway.guardrails import Guardrails
from keel.gateway.keys import KeyAuth, RateLimitHeaders, RequestUsage
from keel.server import admin
from keel.server.auth import require_admin, require_api_key
from keel.server.common import get_state, key_of
from keel.server.outputs_pipeline import counted, guarded, time_limited
from keel.server.errors import APIError, context_length_exceeded, model_not_found
from keel.server.fingerprint import created_time, system_fingerprint
from keel.server.limits import BodyGuard, ServerLimits
from keel.server.metrics import Metrics
from keel.store import ResponseStore

log = logging.getLogger("keel.server")

if TYPE_CHECKING:
    from keel.finetune.jobs import FineTuning
    from keel.store.keys import KeyStore

DEFAULT_MAX_WAITING = 256
# Completion tokens for a request that sets no max_tokens. OpenAI's API would allow the whole rest of
# the context, which for a small model sampling at temperature 1 is minutes of rambling before the
# client sees anything (and the openai client times out after 600 s and silently retries).
DEFAULT_MAX_TOKENS = 1024


@dataclass
class ServerState:
    engine: LLMEngine  # for startup and tests only: routes reach the engine through `client`
    client: AsyncEngine
    served_model_name: str
    api_key: str | None
    fingerprint: str
    created: int
    metrics: Metrics = field(default_factory=Metrics)
    allow_lora_updates: bool = True
    embeddings: EmbeddingService | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    lora_policy: LoRAPolicy = field(default_factory=LoRAPolicy)
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: the rest of the context
    responses: ResponseStore = field(default_factory=ResponseStore)  # stored Responses API responses
    request_timeout_s: float | None = None  # generation time limit per request (None: none)
    fine_tuning: "FineTuning | None" = None  # files and fine-tuning jobs (keel.finetune.jobs); None: turned off
    auth: KeyAuth = field(default_factory=lambda: KeyAuth(None))  # who may call what (keel.gateway.keys)
    guardrails: Guardrails | None = None  # content policies (keel.gateway.guardrails)
    _adapter_fps: dict[str, str] = field(default_factory=dict)
    _policy_fps: dict[tuple[str, str], str] = field(default_factory=dict)

    def served_names(self) -> set[str]:
        """Names a request's `model` may give besides adapters: the chat and the embedding model."""
        return {self.served_model_name, *([self.embeddings.model.name] if self.embeddings else [])}

    def is_adapter(self, name: str) -> bool:
        return self.client.adapters.path_of(name) is not None

    def check_model(self, name: str, key=None) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for anything else, and for
        a model outside the scope of the request's API key (its existence is not revealed)."""
        if key is not None and not key.allows(name):
            raise model_not_found(name)
        if name == self.served_model_name:
            return None
        if self.is_adapter(name):
            return name
        if self.embeddings is not None and name == self.embeddings.model.name:
            raise APIError(400, f"`{name}` is an embedding model: use POST /v1/embeddings with it. This server's "
                                f"chat model is `{self.served_model_name}`.", code="model_not_supported", param="model")
        raise model_not_found(name)

    def fingerprint_for(self, adapter: str | None, key=None) -> str:
        fp = self.fingerprint
        if adapter is not None:
            path = self.client.adapters.path_of(adapter)
            cached = self._adapter_fps.get(adapter)
            if cached is None and path is not None:
                cached = self._adapter_fps[adapter] = adapter_fingerprint(self.fingerprint, path,
                                                                          self.client.adapters.store_dtype)
            fp = cached or fp
        policy = self.policy_for(adapter or self.served_model_name, key)
        if policy is not None:  # the policy shapes the output: its version is part of what produced it
            key = (fp, policy.version)
            if key not in self._policy_fps:
                self._policy_fps[key] = "fp_" + hashlib.sha256(f"{fp}:{policy.version}".encode()).hexdigest()[:10]
            fp = self._policy_fps[key]
        return fp

    def policy_for(self, model: str, key=None):
        return None if self.guardrails is None else self.guardrails.for_request(model, key)

    def forget_fingerprint(self, adapter: str) -> None:
        self._adapter_fps.pop(adapter, None)

    def max_tokens_for(self, prompt_len: int, requested: int | None, where: str) -> int:
        """The completion budget, or a context_length_exceeded error. Unlike the engine, which would
        quietly shorten max_tokens to fit, the API refuses a request that cannot get what it asked.
        Without max_tokens: default_max_tokens, or what is left of the context if that is less."""
        limit = self.client.info.max_model_len
        if requested is None:
            if prompt_len >= limit:
                raise context_length_exceeded(limit, prompt_len, None, where)
            room = limit - prompt_len
            return room if self.default_max_tokens is None else min(room, self.default_max_tokens)
        if prompt_len + requested > limit:
            raise context_length_exceeded(limit, prompt_len, requested, where)
        return requested

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival: float, adapter: str | None = None,
                 usage: RequestUsage | None = None) -> AsyncIterator[RequestOutput]:
        """usage: where the request's tokens are counted for its API key (see usage_for). The model's
        guardrail policy applies to the prompt here (PolicyViolation for a block) and to the output as
        it streams."""
        policy = self.policy_for(adapter or self.served_model_name, None if usage is None else usage.key)
        if policy is not None and policy.input:
            prompt_ids = self._guard_prompt(policy, prompt_ids)
        source = self.client.generate(request_id, prompt_ids, params, adapter=adapter)
        if policy is not None and policy.output:
            source = guarded(source, policy, self._flagged)
        if self.request_timeout_s is not None:
            source = time_limited(source, self.client, request_id, arrival + self.request_timeout_s)
        if usage is not None:
            source = counted(source, usage, len(prompt_ids))
        return self.metrics.track(source, arrival)

    def _guard_prompt(self, policy, prompt_ids: list[int]) -> list[int]:
        tok = self.client.info.tokenizer
        text = tok.decode(prompt_ids, skip_special_tokens=False)
        flagged: list[str] = []
        try:
            new = guardrails.apply(policy.input, text, "prompt", flagged)
        except guardrails.PolicyViolation as e:
            self._flagged(policy, [e.rule], "prompt", "block")
            raise
        self._flagged(policy, flagged, "prompt", "flag")
        return prompt_ids if new == text else tok.encode(new, add_special_tokens=False)

    def _flagged(self, policy, rules: list[str], where: str, action: str) -> None:
        for rule in rules:
            log.warning("content policy %s: rule %s %sed the %s", policy.name, rule, action.removesuffix("e"), where)
            self.metrics.guardrail.labels(policy.name, rule, where, action).inc()

    def usage_for(self, request: Request, model: str, arrival: float) -> RequestUsage | None:
        key = key_of(request)
        return None if key is None else RequestUsage(self.auth, key, model, arrival)

    def model_card(self) -> dict:
        info = self.client.info
        return {"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "keel",
                "root": self.served_model_name, "parent": None, "max_model_len": info.max_model_len,
                "architecture": info.architecture, "quantization": info.quantization}


def create_app(engine: LLMEngine, *, served_model_name: str, api_key: str | None = None,
               max_waiting: int = DEFAULT_MAX_WAITING, allow_lora_updates: bool = True,
               embedding_model: EmbeddingModel | None = None, engine_threads: int | None = None,
               limits: ServerLimits | None = None, lora_policy: LoRAPolicy | None = None,
               enable_docs: bool = False, default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
               request_timeout_s: float | None = None, response_store: ResponseStore | None = None,
               fine_tuning: "FineTuning | None" = None, api_keys: "KeyStore | None" = None,
               guardrails: Guardrails | None = None) -> FastAPI:
    """embedding_model: served by POST /v1/embeddings under its own name (None: no embeddings).
    allow_lora_updates: POST /v1/load_lora_adapter and /v1/unload_lora_adapter work (when the
    engine serves LoRA adapters); lora_policy says from which folders (by default none: see LoRAPolicy).
    engine_threads: torch's thread count, set from the engine thread (see AsyncEngine).
    limits: request size, time and count limits (keel.server.limits).
    enable_docs: serve /docs, /redoc and /openapi.json (open, like /health: they describe the API and
    hold no data); off by default, so an exposed server does not advertise every route.
    default_max_tokens: completion tokens for requests that give no max_tokens (None: the rest of the
    context, as OpenAI's API).
    response_store: where POST /v1/responses keeps responses (None: in memory, gone with the process).
    request_timeout_s: a request still generating this many seconds after it arrived is ended as if it
    had reached max_tokens (finish_reason "length"); None: no limit.
    fine_tuning: serves /v1/files and /v1/fine_tuning/jobs; the app starts its job runner and stops it
    (keel.finetune.jobs.FineTuning; None: those routes answer 404).
    guardrails: content policies on prompts and answers (keel.gateway.guardrails).
    api_keys: the keys (keel.store.keys.KeyStore) that may call /v1 besides api_key, each scoped to
    models and adapters, rate-limited and metered; managed under /admin with an admin key."""

    client = AsyncEngine(engine, max_waiting=max_waiting, num_threads=engine_threads)
    state = ServerState(engine, client, served_model_name, api_key or None, system_fingerprint(engine),
                        created_time(engine), allow_lora_updates=allow_lora_updates,
                        limits=limits or ServerLimits(), lora_policy=lora_policy or LoRAPolicy(),
                        default_max_tokens=default_max_tokens, request_timeout_s=request_timeout_s,
                        responses=response_store or ResponseStore(), fine_tuning=fine_tuning,
                        auth=KeyAuth(api_keys, api_key or None), guardrails=guardrails)
    state.auth.on_record = state.metrics.key_usage
    if embedding_model is not None:
        if embedding_model.name == served_model_name:
            raise ValueError(f"the embedding model and the chat model are both named {served_model_name!r}")
        state.embeddings = EmbeddingService(embedding_model, state.created, state.limits.max_embedding_inputs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.fine_tuning is not None:
            state.fine_tuning.start()
        yield
        if state.fine_tuning is not None:
            state.fine_tuning.shutdown()
        client.shutdown()
        if state.embeddings is not None:
            state.embeddings.shutdown()
        state.responses.close()
        state.auth.close()

    # FastAPI's own /docs and /redoc load their scripts from a CDN (blank offline): keel serves its own
    app = FastAPI(title="keel", version=keel.__version__, lifespan=lifespan, debug=False, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json" if enable_docs else None)
    app.state.keel = state
    errors.install(app)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(BodyGuard, limits=state.limits)  # outermost: no handler sees an unchecked body

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    v1.include_router(chat.router)
    v1.include_router(completions.router)
    v1.include_router(adapters.router)
    v1.include_router(embeddings.router)
    v1.include_router(responses.router)
    v1.include_router(files.router)
    v1.include_router(ft_routes.router)

    @v1.get("/models")
    async def list_models(request: Request):
        s = get_state(request)
        extra = [s.embeddings.card()] if s.embeddings is not None else []
        key = key_of(request)
        cards = [c for c in [s.model_card(), *extra, *adapter_cards(s)] if key is None or key.allows(c["id"])]
        return {"object": "list", "data": cards}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        s = get_state(request)
        key = key_of(request)
        if key is not None and not key.allows(model_id):
            raise model_not_found(model_id)
        if s.embeddings is not None and model_id == s.embeddings.model.name:
            return s.embeddings.card()
        if s.check_model(model_id) is None:
            return s.model_card()
        return next(c for c in adapter_cards(s) if c["id"] == model_id)

    app.include_router(v1)
    app.include_router(admin.router, prefix="/admin", dependencies=[Depends(require_api_key), Depends(require_admin)])

    # /health and /metrics stay open when an API key is set: load balancers and Prometheus scrape
    # them without credentials, and they reveal no prompts or outputs.
    @app.get("/health")
    async def health(request: Request):
        s = get_state(request)
        if s.client.dead is not None:
            return JSONResponse({"status": "error", "detail": "the engine loop stopped"}, status_code=503)
        return {"status": "ok", "model": s.served_model_name}

    @app.get("/", include_in_schema=False)
    async def landing(request: Request):
        s = get_state(request)
        models = [s.served_model_name, *([s.embeddings.model.name] if s.embeddings else [])]
        return HTMLResponse(pages.landing(keel.__version__, models, enable_docs, s.auth.required))

    if enable_docs:
        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request):
            return HTMLResponse(pages.api_docs(request.app.openapi()))

    @app.get("/metrics")
    async def metrics(request: Request):
        s = get_state(request)
        return PlainTextResponse(s.metrics.render(s.client), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

