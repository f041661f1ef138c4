"""API keys from the database: hashed at rest, scoped to models and adapters (a tenant cannot see, call,
load or unload another's), revoked at once, rate-limited with OpenAI's 429 and headers, budgeted, and
metered (usage totals equal the sum of the responses' usage). Through the official openai client."""

from __future__ import annotations

import shutil
import sqlite3

import openai
import pytest

from keel.engine.llm_engine import LLMEngine
from keel.config import CacheConfig
from keel.server import create_app
from keel.server.adapters import LoRAPolicy
from keel.store.db import Database
from keel.store.keys import KeyStore
from tests.lora.conftest import lora_case  # noqa: F401  (the fixture: a tiny model and PEFT adapters)
from tests.server.conftest import LiveServer

BASE = "tiny-base"
MSG = [{"role": "user", "content": "t5 t6 t7"}]
PROMPT = [5, 6, 7]


@pytest.fixture(scope="module")
def env(lora_case, tmp_path_factory):  # noqa: F811
    ckpt, _, adapters = lora_case("llama-gqa")
    root = tmp_path_factory.mktemp("keys")
    db_path = root / "keel.sqlite3"
    store = KeyStore(Database(f"sqlite:///{db_path}"))
    engine = LLMEngine(ckpt, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=512), enable_lora=True)
    for name in ("acme-qv", "globex-qv"):
        shutil.copytree(adapters["qv-r4"][0], root / name)
        engine.adapters.add(name, str(root / name))
    app = create_app(engine, served_model_name=BASE, api_key="server-admin-secret", api_keys=store,
                     lora_policy=LoRAPolicy(roots=[str(tmp_path_factory.getbasetemp())]))
    with LiveServer(app) as server:
        yield server, store, root, db_path, adapters


def client(server, key: str) -> openai.OpenAI:
    return server.client(api_key=key)


def test_secrets_are_stored_only_as_hashes(env):
    server, store, _, db_path, _ = env
    _, secret = store.create("hash-check")
    dump = "\n".join(sqlite3.connect(db_path).iterdump())
    assert secret not in dump and secret[8:30] not in dump
    assert store.lookup(secret).name == "hash-check" and store.lookup(secret + "x") is None


def test_tenants_see_and_call_only_their_models_and_adapters(env):
    server, store, root, _, adapters = env
    _, acme = store.create("acme", models=[BASE, "acme-*"])
    _, globex = store.create("globex", models=["globex-*"])
    a, g = client(server, acme), client(server, globex)
    assert {m.id for m in a.models.list()} == {BASE, "acme-qv"}
    assert {m.id for m in g.models.list()} == {"globex-qv"}
    assert a.completions.create(model="acme-qv", prompt=PROMPT, max_tokens=2).choices[0].text
    for call in (lambda: g.chat.completions.create(model="acme-qv", messages=MSG, max_tokens=2),
                 lambda: g.completions.create(model=BASE, prompt="t5", max_tokens=2),
                 lambda: g.models.retrieve("acme-qv"),
                 lambda: g.responses.create(model=BASE, input="t5", max_output_tokens=2)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found"  # the same answer as for a model that does not exist
    with server.http() as h:
        auth = {"Authorization": f"Bearer {globex}"}
        r = h.post("/v1/unload_lora_adapter", json={"lora_name": "acme-qv"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "acme-evil", "lora_path": str(root / "acme-qv")},
                   headers=auth)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "globex-new", "lora_path": adapters["qv-r4"][0]},
                   headers=auth)
        assert r.status_code == 200
    assert "acme-qv" in {m.id for m in a.models.list()}  # still served for its owner
    assert "globex-new" in {m.id for m in g.models.list()} and "globex-new" not in {m.id for m in a.models.list()}


def test_a_revoked_key_fails_at_once_and_unknown_keys_fail(env):
    server, store, _, _, _ = env
    key, secret = store.create("short-lived")
    c = client(server, secret)
    assert c.models.list().data
    assert store.revoke(key.id) and not store.revoke(key.id)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-keel-made-up").models.list()


def test_requests_per_minute_give_429_with_openai_headers(env):
    server, store, _, _, _ = env
    _, secret = store.create("slow", rpm=3)
    with server.http() as h:
        codes = [h.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}) for _ in range(5)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in codes[:3]] == ["2", "1", "0"]  # on answers too
    r = codes[3]
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-limit-requests"] == "3" and r.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        client(server, secret).models.list()


def test_usage_totals_equal_the_responses_usage_and_budgets_stop_a_key(env):
    server, store, _, _, _ = env
    key, secret = store.create("metered", models=[BASE], budget_tokens=60, tpm=10**6)
    c = client(server, secret)
    total = [0, 0]
    for n in (3, 5):
        u = c.completions.create(model=BASE, prompt=PROMPT, max_tokens=n).usage
        total[0] += u.prompt_tokens
        total[1] += u.completion_tokens
    raw = c.completions.with_raw_response.create(model=BASE, prompt=PROMPT, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True})
    assert raw.headers["x-ratelimit-limit-tokens"] == str(10**6)  # a stream carries them too
    stream = raw.parse()
    u = [ch.usage for ch in stream if ch.usage][0]
    total[0] += u.prompt_tokens
    total[1] += u.completion_tokens
    server.app.state.keel.auth.flush()
    [row] = store.usage(key.id)
    assert (row["model"], row["requests"], row["errors"]) == (BASE, 3, 0)
    assert [row["prompt_tokens"], row["completion_tokens"]] == total
    assert row["latency_ms"] > 0
    m = server.metrics()
    assert m[f'keel_api_key_tokens_total{{key_id="{key.id}",kind="completion",model="{BASE}"}}'] == total[1]
    assert m[f'keel_api_key_requests_total{{key_id="{key.id}",model="{BASE}",outcome="ok"}}'] == 3
    assert sum(total) < 60
    while store.tokens_used(key.id) < 60:  # spend the rest of the budget
        c.completions.create(model=BASE, prompt=PROMPT, max_tokens=8)
        server.app.state.keel.auth.flush()
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
    assert e.value.code == "insufficient_quota"


def test_admin_endpoints_manage_keys(env):
    server, store, _, _, _ = env
    with server.http() as h:
        admin = {"Authorization": "Bearer server-admin-secret"}
        r = h.post("/admin/keys", json={"name": "via-http", "models": [BASE], "rpm": 100}, headers=admin)
        assert r.status_code == 200
        made = r.json()
        assert made["key"].startswith("sk-keel-") and made["models"] == [BASE]
        tenant = {"Authorization": f"Bearer {made['key']}"}
        assert h.get("/v1/models", headers=tenant).status_code == 200
        assert h.get("/admin/keys", headers=tenant).status_code == 403  # a tenant key is no admin
        listed = h.get("/admin/keys", headers=admin).json()["data"]
        assert made["id"] in {k["id"] for k in listed} and all("key" not in k for k in listed)
        assert h.delete(f"/admin/keys/{made['id']}", headers=admin).json()["deleted"] is True
        assert h.get("/v1/models", headers=tenant).status_code == 401
        assert h.delete(f"/admin/keys/{made['id']}", headers=admin).status_code == 404
        assert h.get("/admin/usage", headers=admin).status_code == 200
        for bad in ({"name": ""}, {"name": "x", "rpm": 0}, {"name": "x", "models": [""]}, {"name": "x", "extra": 1},
                    {"name": "x", "models": ["a" * 600]}):
            r = h.post("/admin/keys", json=bad, headers=admin)
            assert r.status_code == 400 and r.json()["error"]["message"], bad


def test_the_server_key_still_works_and_sees_everything(env):
    server, _, _, _, _ = env
    ids = {m.id for m in client(server, "server-admin-secret").models.list()}
    assert {BASE, "acme-qv", "globex-qv"} <= ids
    with server.http() as h:  # no key at all
        r = h.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_keel_keys_command(tmp_path, capsys):
    import json

    from keel.cli import main
    base = ["keys", "--data-dir", str(tmp_path)]
    assert main(base + ["create", "acme", "--models", "acme-*,tiny-base", "--rpm", "5", "--budget", "1000"]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    card = json.loads(out.err)
    assert secret.startswith("sk-keel-") and card["models"] == ["acme-*", "tiny-base"] and card["rpm"] == 5
    store = KeyStore(Database(f"sqlite:///{tmp_path / 'keel.sqlite3'}"))
    assert store.lookup(secret).id == card["id"]
    assert main(base + ["list"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == card["id"]
    assert main(base + ["revoke", card["id"]]) == 0 and store.lookup(secret) is None
    assert main(base + ["revoke", card["id"]]) == 2  # already revoked: an error, not a crash
    assert main(base + ["create", "bad", "--rpm", "0"]) == 2
