"""`keel gateway --config gateway.yaml`: model aliases mapped to ordered backends.

    health_check_interval_s: 2        # each backend's GET /models, also how its models are learned
    retries: 3                        # more attempts after the first, on other backends where there are
    backoff_s: 0.05                   # before retry k: backoff_s * 2**k
    circuit_failures: 3               # consecutive failures that open a backend's circuit ...
    circuit_cooldown_s: 10            # ... for this long, then one request may try it again
    models:
      chat:                           # the name clients send as `model`
        timeout_s: 300                # the whole request, failovers included
        backends:                     # in order of preference: a lower priority is tried first,
          - url: http://10.0.0.1:8000/v1        # backends of one priority are replicas (least loaded first)
            model: SmolLM2-135M-Instruct        # the name this backend knows (default: the alias)
          - url: http://10.0.0.2:8000/v1
            model: SmolLM2-135M-Instruct
          - url: https://api.openai.com/v1      # any OpenAI-compatible API
            model: gpt-4o-mini
            api_key_env: OPENAI_API_KEY         # the key, from the environment (never in the file)
            priority: 1

A name that is no alias goes to the backends that list it in their GET /models (a LoRA adapter served by
some keel servers, say).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from keel.errors import KeelError


@dataclass(frozen=True)
class BackendConfig:
    url: str  # the base URL, ending in /v1
    model: str | None = None  # the model name at this backend (None: the alias)
    name: str | None = None  # shown in x-keel-backend and metrics (default: the URL's host:port)
    api_key_env: str | None = None
    priority: int = 0

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.url.split("://", 1)[-1].split("/", 1)[0]

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True)
class AliasConfig:
    backends: tuple[BackendConfig, ...]
    timeout_s: float = 300.0


@dataclass(frozen=True)
class GatewayConfig:
    models: dict[str, AliasConfig] = field(default_factory=dict)
    health_check_interval_s: float = 2.0
    retries: int = 3
    backoff_s: float = 0.05
    circuit_failures: int = 3
    circuit_cooldown_s: float = 10.0


def _number(d: dict, key: str, default, where: str, minimum: float = 0.0):
    value = d.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise KeelError(f"{where}{key}={value!r} is invalid: give a number >= {minimum:g}")
    return value


def parse(data: dict) -> GatewayConfig:
    """A GatewayConfig from the YAML/JSON mapping; KeelError naming the bad field."""
    if not isinstance(data, dict):
        raise KeelError("the gateway config must be a mapping with `models`")
    known = {"models", "health_check_interval_s", "retries", "backoff_s", "circuit_failures", "circuit_cooldown_s"}
    if unknown := set(data) - known:
        raise KeelError(f"unknown gateway setting(s): {', '.join(sorted(unknown))}")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise KeelError("the gateway config needs `models`: alias -> {backends: [...]}")
    aliases = {}
    for alias, spec in models.items():
        where = f"models.{alias}."
        if not isinstance(spec, dict) or not isinstance(spec.get("backends"), list) or not spec["backends"]:
            raise KeelError(f"{where}backends: give a list of at least one backend")
        backends = []
        for i, b in enumerate(spec["backends"]):
            bw = f"{where}backends[{i}]."
            if not isinstance(b, dict) or not isinstance(b.get("url"), str) or "://" not in b["url"]:
                raise KeelError(f"{bw}url: give the backend's base URL, as http://host:port/v1")
            if extra := set(b) - {"url", "model", "name", "api_key_env", "priority"}:
                raise KeelError(f"{bw}: unknown field(s) {', '.join(sorted(extra))}")
            if b.get("api_key_env") and b["api_key_env"] not in os.environ:
                raise KeelError(f"{bw}api_key_env: ${b['api_key_env']} is not set")
            backends.append(BackendConfig(b["url"].rstrip("/"), b.get("model"), b.get("name"), b.get("api_key_env"),
                                          int(_number(b, "priority", 0, bw))))
        aliases[str(alias)] = AliasConfig(tuple(backends), float(_number(spec, "timeout_s", 300.0, where, 0.001)))
    return GatewayConfig(aliases, float(_number(data, "health_check_interval_s", 2.0, "", 0.05)),
                         int(_number(data, "retries", 3, "")), float(_number(data, "backoff_s", 0.05, "")),
                         int(_number(data, "circuit_failures", 3, "", 1)),
                         float(_number(data, "circuit_cooldown_s", 10.0, "")))


def load(path: str) -> GatewayConfig:
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise KeelError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise KeelError(f"--config {path}: not valid YAML ({e})") from None
    return parse(data)
