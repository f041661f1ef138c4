"""The OpenAI-compatible HTTP server (`keel serve`).

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (+ GET/DELETE),
POST /v1/embeddings, /v1/files, /v1/fine_tuning/jobs, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter, GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus).

What the API accepts, besides the fields it honours:

- Ignored on chat and completions (hosted-service features: storage, billing, routing, caching,
  moderation and hosted tools a self-hosted server does not have; they do not change the generated
  tokens; keel.server.protocol.HOSTED_ONLY_FIELDS): store, metadata, service_tier, prediction,
  reasoning_effort, web_search_options, prompt_cache_key, prompt_cache_retention, prompt_cache_options,
  safety_identifier, verbosity, moderation, user; and stream_options.include_obfuscation.
- Structured output: response_format text, json_object and json_schema (always enforced, strict
  or not; a schema the grammar library cannot enforce is a 400); tools with tool_choice none, auto,
  required or a named function, and parallel_tool_calls (see keel/server/tools.py).
- 400, not supported yet: functions and function_call (deprecated), audio output (audio,
  modalities other than ["text"]); on completions suffix, best_of != n, echo together with logprobs.
- vLLM extensions: top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids,
  include_stop_str_in_output, skip_special_tokens.
- Anything else unknown is a 400 naming the field.
"""

from keel.server.app import create_app

__all__ = ["create_app"]
