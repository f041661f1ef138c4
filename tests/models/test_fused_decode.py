"""Decode steps through the whole decoder in one C call (keel/models/fused_decode.py) give exactly what
the module-by-module path gives, and run wherever every part of the model is on keel's CPU kernels."""

from __future__ import annotations

import pytest

from keel import LLM, SamplingParams
from keel.kernels.cpu import kernels
from keel.models.fused_decode import DecodeStack

pytestmark = pytest.mark.skipif(kernels() is None, reason="keel's CPU kernels need Linux, AVX2, FMA and a C compiler")

PROMPTS = [[5, 6, 7], [9, 30, 31, 32, 33, 34, 35, 36, 40], [70], [3, 4] * 20]


@pytest.mark.parametrize("case,quant", [("llama-gqa", None), ("llama-bias", None), ("qwen2-bias", None),
                                        ("llama-tied", None), ("llama-mqa", "int4"), ("llama-gqa", "int8"),
                                        ("qwen3-qknorm", None)])
def test_decode_stack_matches_the_module_path_bit_for_bit(checkpoints, case, quant, monkeypatch):
    folder, _ = checkpoints(case)
    calls = []
    run = DecodeStack.run
    monkeypatch.setattr(DecodeStack, "run", lambda self, *a: calls.append(a[0].shape[0]) or run(self, *a))
    kw = dict(dtype="float32", max_model_len=128, quantization=quant)
    fused, plain = LLM(folder, **kw), LLM(folder, **kw)
    plain.engine.model.decode_stack = False  # the module path only
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=10, ignore_eos=True, logprobs=3)
    for params in (greedy, seeded):
        a, b = fused.generate(PROMPTS, params), plain.generate(PROMPTS, params)
        for x, y in zip(a, b):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
            assert [lp.logprob for lp in x.outputs[0].logprobs] == [lp.logprob for lp in y.outputs[0].logprobs]
            assert [lp.top for lp in x.outputs[0].logprobs] == [lp.top for lp in y.outputs[0].logprobs]
    if case == "qwen3-qknorm":  # q/k norms are not in the C stack: the module path runs
        assert fused.engine.model.decode_stack is False and not calls
    else:
        assert isinstance(fused.engine.model.decode_stack, DecodeStack)
        assert max(calls) == len(PROMPTS) and len(calls) >= 2 * 9  # every decode step of both runs


def test_the_stack_is_built_once_at_start_and_follows_tensors_that_move(checkpoints):
    """Built with the engine (not lazily at a first forward); it keeps every tensor it points at alive, and
    when one is replaced (a KV cache reallocated, a weight swapped) the next step rebuilds it over the new
    tensors instead of writing through stale addresses."""
    import torch
    folder, _ = checkpoints("llama-gqa")
    llm = LLM(folder, dtype="float32", max_model_len=128)
    model = llm.engine.model
    stack = model.decode_stack
    assert isinstance(stack, DecodeStack) and not stack.moved()
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    want = llm.generate(PROMPTS, greedy)
    attn = model.model.layers[1].self_attn.attn
    old = attn.k_cache
    snapshot = old.clone()
    attn.k_cache = old.clone()  # the same contents at a new address
    for i, t in enumerate(llm.engine.runner.kv_caches):
        if t is old:
            llm.engine.runner.kv_caches[i] = attn.k_cache
    assert stack.moved()
    proj = model.model.layers[0].mlp.down_proj
    proj.weight = torch.nn.Parameter(proj.weight.data.clone(), requires_grad=False)  # a weight swapped
    got = llm.generate(PROMPTS, greedy)
    assert model.decode_stack is not stack and isinstance(model.decode_stack, DecodeStack)
    assert not model.decode_stack.moved()
    for x, y in zip(want, got):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert [lp.top for lp in x.outputs[0].logprobs] == [lp.top for lp in y.outputs[0].logprobs]
    # the new cache, not the old one, got this run's keys: nothing wrote through the old address
    assert torch.equal(old, snapshot) and not torch.equal(attn.k_cache, snapshot)
