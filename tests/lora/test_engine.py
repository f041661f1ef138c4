"""Engine behaviour with adapters: prefix cache per adapter, unloading and reloading, listing, the async
engine, and LRU residency."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from keel import LLM, SamplingParams
from keel.engine.async_engine import AsyncEngine
from keel.errors import LoRANotFoundError
from keel.lora import LoRARequest
from tests.lora.conftest import hf_greedy

PROMPT = list(range(30, 50))  # 20 tokens: 5 full blocks of 4
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def env(lora_case):
    ckpt, hf, adapters = lora_case("llama-gqa")
    llm = LLM(ckpt, dtype="float32", num_blocks=256, block_size=4, enable_lora=True, max_loras=2, max_cpu_loras=2)
    for name in ("qv-r4", "all-r16", "all-r8-rslora"):
        llm.add_lora(name, adapters[name][0])
    expected = {name: hf_greedy(pm, PROMPT, 8) for name, (_, pm) in adapters.items()}
    expected[None] = hf_greedy(hf, PROMPT, 8)
    return llm, adapters, expected


def run(llm, name, prompt=PROMPT):
    return llm.generate([prompt], GREEDY, lora_request=None if name is None else LoRARequest(name))[0]


def test_prefix_cache_entries_belong_to_one_adapter(env):
    llm, _, expected = env
    first = run(llm, "qv-r4")
    assert first.num_cached_tokens == 0 and first.outputs[0].token_ids == expected["qv-r4"]
    again = run(llm, "qv-r4")
    assert again.num_cached_tokens == 16 and again.outputs[0].token_ids == expected["qv-r4"]
    other = run(llm, "all-r16")  # same prompt, another adapter: nothing shared
    assert other.num_cached_tokens == 0 and other.outputs[0].token_ids == expected["all-r16"]
    base = run(llm, None)
    assert base.num_cached_tokens == 0 and base.outputs[0].token_ids == expected[None]
    assert run(llm, "all-r16").num_cached_tokens == 16


def test_lru_residency_with_more_adapters_than_slots(env):
    llm, _, expected = env
    mgr = llm.engine.lora
    names = ["qv-r4", "all-r16", "all-r8-rslora", None]
    outs = llm.generate([PROMPT] * 8, GREEDY, lora_request=[None if n is None else LoRARequest(n) for n in names * 2])
    for n, out in zip(names * 2, outs):
        assert out.outputs[0].token_ids == expected[n], n
    assert mgr.num_resident <= 2 and mgr.num_in_host <= 2


def test_unload_while_running_then_reload_elsewhere(env, tmp_path):
    llm, adapters, expected = env
    eng = llm.engine
    tmp = str(tmp_path / "copy")
    shutil.copytree(adapters["mlp-r8-layer1"][0], tmp)
    old_id = eng.adapters.add("temp", tmp)
    eng.add_request("u1", PROMPT, GREEDY, adapter="temp")
    eng.step()
    eng.adapters.remove("temp")  # the running request finishes with it
    assert "temp" not in {i.name for i in eng.adapters.list()}
    with pytest.raises(LoRANotFoundError):
        eng.add_request("u2", PROMPT, GREEDY, adapter="temp")
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            done[out.request_id] = out
    assert done["u1"].outputs[0].token_ids == expected["mlp-r8-layer1"]
    # the same name, other weights: a new id, so no prefix-cache hit on the old adapter's blocks
    new_id = eng.adapters.add("temp", adapters["qv-r4"][0])
    assert new_id != old_id
    out = run(llm, "temp")
    assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == expected["qv-r4"]
    eng.adapters.remove("temp")
    run(llm, "qv-r4")  # the removed adapter's slot is reused
    assert old_id not in eng.lora.slot_of and new_id not in eng.lora.slot_of


def test_list_and_register_dir(env, tmp_path):
    llm, adapters, _ = env
    eng = llm.engine
    for name in ("x1", "x2"):
        shutil.copytree(adapters["qv-r4"][0], tmp_path / name)
    (tmp_path / "empty").mkdir()
    assert eng.adapters.register_dir(str(tmp_path)) == ["x1", "x2"]
    info = {i.name: i for i in eng.adapters.list()}
    assert not info["x1"].validated and not info["x1"].in_host and info["qv-r4"].validated
    assert len({i.adapter_id for i in info.values()}) == len(info)
    assert run(llm, "x2").outputs[0].token_ids == run(llm, "qv-r4").outputs[0].token_ids
    assert {i.name: i for i in eng.adapters.list()}["x2"].validated


def test_async_engine_mixes_adapters_in_concurrent_requests(env):
    llm, _, expected = env
    aeng = AsyncEngine(llm.engine)
    names = ["qv-r4", None, "all-r16", "all-r8-rslora", "qv-r4"]

    async def one(i, name):
        last = None
        async for out in aeng.generate(f"async-{i}", PROMPT, GREEDY, adapter=name):
            last = out
        return last.outputs[0].token_ids

    async def main():
        results = await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))
        with pytest.raises(LoRANotFoundError):
            async for _ in aeng.generate("async-bad", PROMPT, GREEDY, adapter="nobody"):
                pass
        return results
    try:
        results = asyncio.run(main())
    finally:
        aeng.shutdown()
    for n, got in zip(names, results):
        assert got == expected[n], n
    assert aeng.dead is None


def test_float32_adapter_stacks_keep_full_precision(lora_case, tmp_path):
    """An adapter saved in float32 with values a bfloat16 cannot hold: the default stacks ("auto") and
    lora_dtype="float32" keep them as they are and match PEFT; "bfloat16" (opt-in, where keel's CPU
    kernel runs) rounds them and still serves."""
    from tests.lora.conftest import ADAPTERS, make_peft_adapter
    ckpt, hf, _ = lora_case("llama-gqa")
    folder = str(tmp_path / "fp32")
    pm = make_peft_adapter(hf, folder, seed=11, bf16_exact=False, **ADAPTERS["all-r16"])
    want = hf_greedy(pm, PROMPT, 8)
    from keel.kernels.cpu import kernels
    for lora_dtype in ("float32", "auto", "bfloat16"):
        if lora_dtype == "bfloat16" and kernels() is None:
            continue
        llm = LLM(ckpt, dtype="float32", num_blocks=64, block_size=4, enable_lora=True, lora_dtype=lora_dtype)
        llm.add_lora("fp32", folder)
        out = run(llm, "fp32").outputs[0].token_ids
        if lora_dtype != "bfloat16":
            assert out == want
            assert all(layer.a.dtype == torch.float32 for layer in llm.engine.lora.layers.values())
        else:  # rounded to bfloat16: close, not bit-equal, so only the storage is checked
            assert len(out) == 8 and all(layer.a.dtype == torch.bfloat16 for layer in llm.engine.lora.layers.values())
