"""Adapters made with PEFT give the same greedy tokens and logits through keel as through PEFT, alone and
mixed in one batch with each other and with base-model requests."""

from __future__ import annotations

import pytest
import torch

from keel import LLM, SamplingParams
from keel.layers.attention import AttentionMetadata
from keel.lora import LoRARequest
from keel.lora.layers import LoRACosts, LoRAMetadata
from tests.lora.conftest import ADAPTERS, hf_greedy

PROMPTS = [[5, 6, 7], list(range(10, 27)), [(i * 7) % 250 + 2 for i in range(41)]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def wait_ready(mgr, aid: int) -> None:
    for _ in range(200):
        if mgr.is_ready(aid):
            return
        mgr.wait_for_loads(0.05)
    raise AssertionError(f"adapter {aid} never loaded")


def keel_lora_logits(llm: LLM, prompts: list[list[int]], names: list[str | None]) -> list[torch.Tensor]:
    """Every prompt prefilled in one forward pass, each with its adapter; logits of every position."""
    eng, mgr = llm.engine, llm.engine.lora
    ids = [None if n is None else mgr.resolve(n) for n in names]
    active = list(dict.fromkeys(a for a in ids if a is not None))
    for aid in active:
        wait_ready(mgr, aid)
    plan = mgr.prepare_step(active, set(active))
    order = sorted(range(len(prompts)), key=lambda i: plan.positions.get(ids[i], len(active)))
    counts = [0] * len(active)
    for i in order:
        if ids[i] is not None:
            counts[plan.positions[ids[i]]] += len(prompts[i])
    bs = eng.cache_config.block_size
    tables = [eng.pool.allocate(-(-len(prompts[i]) // bs)) for i in order]
    try:
        lens = [len(prompts[i]) for i in order]
        meta = AttentionMetadata.build(lens, lens, tables, bs, eng.device)
        x = torch.tensor([t for i in order for t in prompts[i]])
        pos = torch.tensor([p for i in order for p in range(len(prompts[i]))])
        with torch.inference_mode():
            logits = eng.model.compute_logits(eng.model(x, pos, meta, LoRAMetadata.build(counts, plan.groups, eng.device)))
    finally:
        for t in tables:
            eng.pool.free(t)
    by_order = logits.split(lens)
    out = [None] * len(prompts)
    for k, i in enumerate(order):
        out[i] = by_order[k]
    return out


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2-bias", "qwen3-qknorm"])
def setup(request, lora_case):
    ckpt, hf, adapters = lora_case(request.param)
    llm = LLM(ckpt, dtype="float32", num_blocks=256, block_size=4, enable_lora=True, max_loras=len(ADAPTERS))
    for name, (folder, _) in adapters.items():
        llm.add_lora(name, folder)
    expected = {(name, k): hf_greedy(pm, p, 24) for name, (_, pm) in adapters.items() for k, p in enumerate(PROMPTS)}
    expected.update({(None, k): hf_greedy(hf, p, 24) for k, p in enumerate(PROMPTS)})
    return request.param, llm, hf, adapters, expected


def test_each_adapter_alone_matches_peft(setup):
    case, llm, _, adapters, expected = setup
    for name in adapters:
        outs = llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest(name))
        for k, out in enumerate(outs):
            assert out.outputs[0].token_ids == expected[(name, k)], (case, name, k)


def test_all_adapters_mixed_with_base_in_one_batch(setup):
    case, llm, _, adapters, expected = setup
    names = [None] + list(adapters)
    jobs = [(n, k) for k in range(len(PROMPTS)) for n in names]
    outs = llm.generate([PROMPTS[k] for _, k in jobs], GREEDY,
                        lora_request=[None if n is None else LoRARequest(n) for n, _ in jobs])
    for (n, k), out in zip(jobs, outs):
        assert out.outputs[0].token_ids == expected[(n, k)], (case, n, k)
    # and the batch really was mixed: all adapters were resident together
    assert llm.engine.lora.num_resident == len(adapters)


@pytest.mark.parametrize("costs", ["model", "forced"])
def test_requests_arriving_mid_run_mix_prefill_and_decode(setup, costs):
    """New prompts (many tokens of one adapter) join steps where others decode (one token each). With
    "forced" costs every step splits slots by rank and runs every slot's rows past the first on their own
    (overflow), which the tiny model's own costs never choose."""
    case, llm, _, adapters, expected = setup
    eng = llm.engine
    saved = eng.lora.costs
    if costs == "forced":
        eng.lora.costs = LoRACosts(overflow_cost_rows=0, split_min_rank_slots=0)
    names = list(adapters)
    arrivals = {0: [(names[0], 0), (names[1], 0)], 2: [(names[2], 2), (None, 1)], 5: [(names[3], 2), (names[0], 1)]}
    done, step = {}, 0
    while step <= max(arrivals) or eng.has_unfinished_requests():
        for n, k in arrivals.get(step, []):
            eng.add_request(f"mid-{n}-{k}-{step}", PROMPTS[k], GREEDY, adapter=n)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    eng.lora.costs = saved
    for s, jobs in arrivals.items():
        for n, k in jobs:
            assert done[f"mid-{n}-{k}-{s}"] == expected[(n, k)], (case, n, k)


def test_logits_close_to_peft(setup):
    case, llm, hf, adapters, _ = setup
    names = [None] + list(adapters)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    for name, prompt, ours in zip(names, prompts, keel_lora_logits(llm, prompts, names)):
        model = hf if name is None else adapters[name][1]
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0].float()
        span = (ref.max() - ref.min()).item()
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4 * span, f"{case}/{name}: max |logit diff| {diff:.3g} over range {span:.3g}"


def test_pytorch_path_matches_peft_alone_and_mixed(lora_case):
    """The same PEFT parity with keel's kernels off (--kernels torch): adapters through fixed-size row
    blocks, attention one query at a time."""
    ckpt, hf, adapters = lora_case("llama-gqa")
    llm = LLM(ckpt, dtype="float32", num_blocks=256, block_size=4, enable_lora=True, max_loras=len(ADAPTERS),
              kernels="torch")
    assert llm.engine.backend.cpu is None
    for name, (folder, _) in adapters.items():
        llm.add_lora(name, folder)
    names = [None] + list(adapters)
    jobs = [(n, k) for k in range(len(PROMPTS)) for n in names]
    outs = llm.generate([PROMPTS[k] for _, k in jobs], GREEDY,
                        lora_request=[None if n is None else LoRARequest(n) for n, _ in jobs])
    for (n, k), out in zip(jobs, outs):
        pm = hf if n is None else adapters[n][1]
        assert out.outputs[0].token_ids == hf_greedy(pm, PROMPTS[k], 24), (n, k)
