"""Adapter loading as an attacker with the API key would try it: names that are not names, configs
that are huge, deep or hold catastrophic regexes, paths outside the operator's folders (the answer
must not tell whether they exist), and /v1/models showing server paths. Each is a 4xx and the
server serves on."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from keel.config import CacheConfig
from keel.embed import EmbeddingModel
from keel.engine.llm_engine import LLMEngine
from keel.server import create_app
from keel.server.adapters import LoRAPolicy
from tests.embed.conftest import BUILTIN, make_tiny_bert
from tests.lora.conftest import edit_config
from tests.server.conftest import LiveServer
from tests.server.hostile import check_4xx

BASE = "tiny-base"
EMB = "tiny-bert"


@pytest.fixture(scope="module")
def env(lora_case, tmp_path_factory):
    ckpt, _, adapters = lora_case("llama-gqa")
    tmp = tmp_path_factory.mktemp("hostile_lora")
    allowed = tmp / "allowed"
    allowed.mkdir()
    shutil.copytree(adapters["qv-r4"][0], allowed / "good")
    (tmp / "outside").mkdir()
    shutil.copytree(adapters["qv-r4"][0], tmp / "outside" / "secret")
    engine = LLMEngine(ckpt, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=256), enable_lora=True)
    embedder = EmbeddingModel(make_tiny_bert(str(tmp / EMB), {"mean_tokens": True}, True)) if BUILTIN else None
    app = create_app(engine, served_model_name=BASE, embedding_model=embedder,
                     lora_policy=LoRAPolicy(roots=[str(allowed)]))
    with LiveServer(app) as server, server.http() as http:
        yield server, http, tmp, allowed


def load(http, name: str, path: str, **kw):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **kw})


def serving(server, http) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/v1/models").status_code == 200
    r = http.post("/v1/completions", json={"model": BASE, "prompt": [5, 6, 7], "max_tokens": 4})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", [
    "n" * 1_000_000, "two\nlines", "../escape", "a/../b", "/abs", "right\u202eleft", "sp ace", "", "-dash",
    "x" * 129, "tab\t", "nul\u0000",
])
def test_bad_adapter_names_are_a_400(env, name):
    server, http, _, allowed = env
    err = check_4xx(load(http, name, str(allowed / "good")), 400, "lora_name")
    assert len(err["message"]) < 1000
    assert name not in {m["id"] for m in http.get("/v1/models").json()["data"]} or name == ""
    serving(server, http)


def test_names_of_served_models_are_refused(env):
    server, http, _, allowed = env
    names = [BASE] + ([EMB] if BUILTIN else [])
    for name in names:
        check_4xx(load(http, name, str(allowed / "good")), 400, "lora_name")
    assert load(http, "org/good-v1.2", str(allowed / "good")).status_code == 200
    r = http.post("/v1/completions", json={"model": "org/good-v1.2", "prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 200
    assert http.get("/v1/models/org/good-v1.2").json()["parent"] == BASE
    serving(server, http)


def test_paths_outside_the_allowed_folders_all_get_one_answer(env):
    """Existing or not, file or folder, adapter or not, through .. or a symbolic link: one 403, the
    same message, and none of it reveals the server's layout."""
    server, http, tmp, allowed = env
    os.symlink(tmp / "outside" / "secret", allowed / "link-out")
    paths = [str(tmp / "outside" / "secret"), str(tmp / "outside" / "nothing"), "/etc", "/etc/passwd",
             str(allowed / ".." / "outside" / "secret"), str(allowed / "link-out"), "~", "relative/path",
             "/no/such/folder", str(allowed) + "\x00/good"]
    bodies = set()
    for i, p in enumerate(paths):
        r = load(http, f"probe{i}", p)
        err = check_4xx(r, 403, "lora_path", "lora_path_not_allowed")
        bodies.add(err["message"])
        for secret in (os.getcwd(), os.path.expanduser("~"), str(tmp)):
            assert secret not in r.text
    assert len(bodies) == 1, bodies
    assert not any(m["id"].startswith("probe") for m in http.get("/v1/models").json()["data"])
    serving(server, http)


def test_errors_inside_the_allowed_folders_quote_the_path_as_given(env):
    server, http, tmp, allowed = env
    shutil.copytree(allowed / "good", allowed / "noweights")
    os.remove(allowed / "noweights" / "adapter_model.safetensors")
    given = str(allowed / "sub" / ".." / "noweights")
    err = check_4xx(load(http, "noweights", given), 400, "lora_path", "invalid_lora_adapter")
    assert "adapter_model.safetensors is missing" in err["message"] and given in err["message"]
    serving(server, http)


@pytest.mark.parametrize("change, message", [
    ({"target_modules": "(.|.)*X"}, "matches no module"),
    ({"target_modules": r"(a+)+$"}, "matches no module"),
    ({"rank_pattern": {"(.|.)*Y": 4}}, None),
    ({"target_modules": r"(\w+)\1"}, "linear time"),
    ({"rank_pattern": {"(?<=x)q_proj": 4}}, "linear time"),
])
def test_config_regexes_run_in_linear_time(env, change, message):
    server, http, _, allowed = env
    folder = allowed / f"re-{abs(hash(json.dumps(change)))}"
    shutil.copytree(allowed / "good", folder)
    edit_config(str(folder), **change)
    start = time.monotonic()
    r = load(http, folder.name, str(folder))
    assert time.monotonic() - start < 30  # Python's re needs hours for the first two
    if message is None:
        assert r.status_code == 200, r.text
    else:
        assert message in check_4xx(r, 400, "lora_path")["message"]
    serving(server, http)


@pytest.mark.parametrize("kind", ["huge", "deep", "not-object", "bad-alpha"])
def test_hostile_configs_are_a_400(env, kind):
    server, http, _, allowed = env
    folder = allowed / f"cfg-{kind}"
    shutil.copytree(allowed / "good", folder)
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if kind == "huge":
        cfg["padding"] = "x" * (2 << 20)
        text = json.dumps(cfg)
    elif kind == "deep":
        text = json.dumps(cfg)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif kind == "not-object":
        text = "[1, 2, 3]"
    else:
        cfg["alpha_pattern"] = {"q_proj": "not a number"}
        text = json.dumps(cfg)
    cfg_file.write_text(text)
    check_4xx(load(http, f"cfg-{kind}", str(folder)), 400, "lora_path", "invalid_lora_adapter")
    serving(server, http)


def test_models_shows_paths_only_when_asked(lora_case, tmp_path):
    ckpt, _, adapters = lora_case("llama-gqa")
    for show in (False, True):
        engine = LLMEngine(ckpt, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=64), enable_lora=True)
        engine.adapters.add("a", adapters["qv-r4"][0])
        app = create_app(engine, served_model_name=BASE, lora_policy=LoRAPolicy(show_paths=show))
        with LiveServer(app) as s, s.http() as h:
            card = h.get("/v1/models/a").json()
            assert card["root"] == (os.path.realpath(adapters["qv-r4"][0]) if show else "a")
            assert (adapters["qv-r4"][0] in h.get("/v1/models").text) == show
            # no roots given: loading over the API is refused, whatever the path
            check_4xx(load(h, "b", adapters["qv-r4"][0]), 403, "lora_path", "lora_path_not_allowed")
