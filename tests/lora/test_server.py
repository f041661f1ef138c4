"""LoRA adapters through the OpenAI HTTP API: the `model` field picks an adapter, concurrent requests over
several adapters and the base model give PEFT's greedy tokens, /v1/models lists adapters with their
parent, and adapters are loaded and unloaded at run time with vLLM's endpoints; a bad adapter is a 4xx
with its reason and the server keeps serving."""

from __future__ import annotations

import asyncio
import os
import shutil

import openai
import pytest
from safetensors.torch import load_file, save_file

from keel.config import CacheConfig
from keel.engine.llm_engine import LLMEngine
from keel.server import create_app
from keel.server.adapters import LoRAPolicy
from tests.lora.conftest import hf_greedy
from tests.lora.test_validation import _bad_adapters
from tests.server.conftest import LiveServer

BASE = "tiny-base"
PROMPTS = [[5, 6, 7], list(range(10, 27)), [(i * 7) % 250 + 2 for i in range(41)]]
N = 16


@pytest.fixture(scope="module")
def env(lora_case, tmp_path_factory):
    ckpt, hf, adapters = lora_case("llama-gqa")
    root = tmp_path_factory.mktemp("lora_http")
    # 2 resident slots for 4 adapters: concurrent requests wait for, load and evict slots
    engine = LLMEngine(ckpt, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=512),
                       enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=16)
    engine.adapters.add("qv-r4", adapters["qv-r4"][0])  # as `keel serve --lora` does
    lora_dir = root / "dir"
    for name in ("all-r8-rslora", "mlp-r8-layer1"):
        shutil.copytree(adapters[name][0], lora_dir / name)
    engine.adapters.register_dir(str(lora_dir))  # as --lora-dir does: registered, not read
    # loads over the API may read anything under pytest's temporary folders (the adapters are there)
    policy = LoRAPolicy(roots=[str(tmp_path_factory.getbasetemp())])
    with LiveServer(create_app(engine, served_model_name=BASE, lora_policy=policy)) as server:
        yield server, ckpt, hf, adapters, root, lora_case


def expected_text(server, model, prompt) -> list[str]:
    """PEFT's greedy tokens as words ("t12 t7 ..."): the tiny tokenizer's tokens are space-separated."""
    return server.state.engine.tokenizer.decode(hf_greedy(model, prompt, N)).split()


def complete(client, model: str, prompt: list[int]):
    return client.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0,
                                     extra_body={"ignore_eos": True})


def test_models_lists_adapters_with_their_parent(env):
    server, _, _, adapters, root, _ = env
    cards = {m.id: m for m in server.client().models.list().data}
    assert set(cards) == {BASE, "qv-r4", "all-r8-rslora", "mlp-r8-layer1"}
    assert cards[BASE].parent is None
    for name in ("qv-r4", "all-r8-rslora", "mlp-r8-layer1"):
        assert cards[name].parent == BASE
    assert cards["all-r8-rslora"].root == "all-r8-rslora"  # the server's folders stay private by default
    assert server.client().models.retrieve("qv-r4").parent == BASE


def test_concurrent_requests_over_adapters_match_peft(env):
    server, _, hf, adapters, _, _ = env
    served = {"qv-r4": "qv-r4", "all-r8-rslora": "all-r8-rslora", "mlp-r8-layer1": "mlp-r8-layer1"}
    status = server.http().post("/v1/load_lora_adapter",
                                json={"lora_name": "big", "lora_path": adapters["all-r16"][0]})
    assert status.status_code == 200, status.text
    served["all-r16"] = "big"
    jobs = [(served[a], adapters[a][1], p) for a in served for p in PROMPTS] + [(BASE, hf, p) for p in PROMPTS]

    async def run_all():
        client = server.async_client()
        return await asyncio.gather(*(client.completions.create(
            model=m, prompt=p, max_tokens=N, temperature=0, extra_body={"ignore_eos": True}) for m, _, p in jobs))
    outs = asyncio.run(run_all())
    for (model, ref, prompt), out in zip(jobs, outs):
        assert out.model == model
        assert out.choices[0].text.split() == expected_text(server, ref, prompt), (model, prompt)
    # each adapter answers with its own fingerprint, the same every time
    fps = {m: o.system_fingerprint for (m, _, _), o in zip(jobs, outs)}
    assert len(set(fps.values())) == len(fps)
    assert all(o.system_fingerprint == fps[m] for (m, _, _), o in zip(jobs, outs))
    assert server.state.engine.lora.max_loras == 2
    server.wait_idle()


def test_streamed_completion_with_an_adapter(env):
    server, _, _, adapters, _, _ = env
    stream = server.client().completions.create(model="mlp-r8-layer1", prompt=PROMPTS[2], max_tokens=N,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(c.model == "mlp-r8-layer1" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.split() == expected_text(server, adapters["mlp-r8-layer1"][1], PROMPTS[2])


def test_unknown_model_is_404(env):
    server = env[0]
    with pytest.raises(openai.NotFoundError) as e:
        complete(server.client(), "nobody", PROMPTS[0])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nobody")


def test_unload_then_404_then_load_again(env):
    server, _, _, adapters, _, _ = env
    http = server.http()
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "temp", "lora_path": adapters["qv-r4"][0]}).status_code == 200
    # loading the same name and path again is a no-op; another path needs load_inplace
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "temp", "lora_path": adapters["qv-r4"][0]}).status_code == 200
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "temp", "lora_path": adapters["all-r16"][0]})
    assert r.status_code == 400 and "already registered" in r.json()["error"]["message"]
    before = complete(server.client(), "temp", PROMPTS[1])
    assert before.choices[0].text.split() == expected_text(server, adapters["qv-r4"][1], PROMPTS[1])
    gone = str(server.state.lora_policy.roots[0]) + "/no/such/adapter"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "temp", "lora_path": gone, "load_inplace": True})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    kept = complete(server.client(), "temp", PROMPTS[1])  # a bad replacement leaves the old adapter serving
    assert kept.choices[0].text.split() == before.choices[0].text.split()
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "temp", "lora_path": adapters["all-r16"][0],
                                                 "load_inplace": True})
    assert r.status_code == 200, r.text
    after = complete(server.client(), "temp", PROMPTS[1])
    assert after.choices[0].text.split() == expected_text(server, adapters["all-r16"][1], PROMPTS[1])
    assert after.system_fingerprint != before.system_fingerprint
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "temp"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        complete(server.client(), "temp", PROMPTS[0])
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "temp"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"
    assert "temp" not in {m.id for m in server.client().models.list().data}


def test_load_body_errors(env):
    http = env[0].http()
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = http.post("/v1/load_lora_adapter", json={"lora_name": BASE, "lora_path": "/tmp"})
    assert r.status_code == 400 and "already the name of a model" in r.json()["error"]["message"]


HTTP_BAD = ["missing", "bad_json", "dora", "unknown_target", "module_the_base_lacks", "wrong_shape",
            "other_base", "truncated", "pickle_only"]


@pytest.mark.parametrize("kind", HTTP_BAD)
def test_bad_adapter_is_a_400_then_the_server_serves(env, kind):
    server, _, hf, adapters, root, lora_case = env
    good = adapters["all-r8-rslora"][0]

    def copy_good(name: str) -> str:
        dst = str(root / f"bad-{name}")
        shutil.copytree(good, dst)
        return dst
    path, message = _bad_adapters(hf, root, copy_good, lora_case)[kind]()
    http = server.http()
    r = http.post("/v1/load_lora_adapter", json={"lora_name": f"bad-{kind}", "lora_path": path})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["code"] == "invalid_lora_adapter"
    assert f"bad-{kind}" not in {m.id for m in server.client().models.list().data}
    # registered without reading (as --lora-dir does), the first request naming it gets the reason
    server.state.engine.adapters.register(f"lazy-{kind}", path)
    with pytest.raises(openai.BadRequestError) as e:
        complete(server.client(), f"lazy-{kind}", PROMPTS[0])
    assert message in e.value.body["message"] and e.value.body["param"] == "model"
    server.state.engine.adapters.remove(f"lazy-{kind}")
    out = complete(server.client(), "all-r8-rslora", PROMPTS[1])
    assert out.choices[0].text.split() == expected_text(server, adapters["all-r8-rslora"][1], PROMPTS[1])


def test_weights_that_break_after_validation_are_a_400(env):
    server, _, _, adapters, root, _ = env
    p = str(root / "breaks-later")
    shutil.copytree(adapters["qv-r4"][0], p)
    server.state.engine.adapters.register("breaks-later", p)
    server.state.engine.adapters.validate("breaks-later")
    f = os.path.join(p, "adapter_model.safetensors")
    save_file({k: v[:1] for k, v in load_file(f).items()}, f)  # same names, wrong shapes: the load fails
    with pytest.raises(openai.BadRequestError) as e:
        complete(server.client(), "breaks-later", PROMPTS[0])
    assert e.value.body["code"] == "invalid_lora_adapter"
    out = complete(server.client(), BASE, PROMPTS[0])
    assert out.choices[0].text
    server.wait_idle()


def test_lora_off_server_refuses_updates(lora_case):
    engine = LLMEngine(lora_case("llama-gqa")[0], dtype="float32", cache=CacheConfig(block_size=4, num_blocks=64))
    with LiveServer(create_app(engine, served_model_name=BASE)) as server:
        r = server.http().post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "lora_disabled"
        assert [m.id for m in server.client().models.list().data] == [BASE]


def test_updates_can_be_turned_off(lora_case):
    ckpt, _, adapters = lora_case("llama-gqa")
    engine = LLMEngine(ckpt, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=64), enable_lora=True)
    with LiveServer(create_app(engine, served_model_name=BASE, allow_lora_updates=False)) as server:
        r = server.http().post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": adapters["qv-r4"][0]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "lora_updates_disabled"


def test_serve_command_registers_adapters(lora_case, tmp_path, monkeypatch, capsys):
    from keel.cli import main
    from tests.server.test_cli import serve
    ckpt, _, adapters = lora_case("llama-gqa")
    for name in ("a", "b", "c"):
        shutil.copytree(adapters["qv-r4"][0], tmp_path / name)
    (tmp_path / "not-an-adapter").mkdir()
    state = serve(monkeypatch, ckpt, "--dtype", "float32", "--lora", f"mine={adapters['all-r16'][0]}",
                  "--lora-dir", str(tmp_path), "--max-loras", "3", "--max-cpu-loras", "5", "--no-lora-updates")["state"]
    lora = state.engine.lora
    assert {i.name for i in lora.list()} == {"mine", "a", "b", "c"}
    assert (lora.max_loras, lora.max_cpu_loras) == (3, 5) and not state.allow_lora_updates
    assert {i.name for i in lora.list() if i.validated} == {"mine"}  # the folder's adapters wait for first use
    assert main(["serve", ckpt, "--lora", "no-equals-sign"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve", ckpt, "--lora", f"x={tmp_path / 'nope'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
