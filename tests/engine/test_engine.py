"""End-to-end engine behaviour on a tiny random Llama checkpoint: batch invariance (greedy and seeded),
preemption, chunked prefill, prefix caching, n > 1, abort, stop conditions, penalties, logprobs,
streaming deltas, bad input and chat.

Token ids are 0..255; the tokenizer is WordLevel "t0".."t255" split on whitespace; eos is id 1.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from keel import LLM, SamplingParams
from keel.engine.request import RequestStatus
from keel.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from tests.models.conftest import make_checkpoint

EOS = 1
BS = 4  # block size of every engine here, so all of them run the same attention arithmetic


def make_prompt(length: int, salt: int = 0) -> list[int]:
    """A deterministic prompt of ids in 2..255 (no bos, no eos)."""
    return [(i * 7 + salt * 13 + 3) % 254 + 2 for i in range(length)]


PROMPTS = [make_prompt(n, salt=k) for k, n in enumerate([3, 7, 12, 25, 41, 60])]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def seeded(seed: int, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=max_tokens, ignore_eos=True)


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("engine_ckpt") / "llama-gqa")
    make_checkpoint(folder, "llama-gqa")
    return folder


@pytest.fixture(scope="module")
def ref_llm(ckpt) -> LLM:
    """Reference engine for solo runs: big pool, no prefix cache."""
    return LLM(ckpt, dtype="float32", block_size=BS, num_blocks=512, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    """The engine under test for batching: big pool, prefix cache on."""
    return LLM(ckpt, dtype="float32", block_size=BS, num_blocks=512)


@pytest.fixture(scope="module")
def solo(ref_llm):
    """solo(prompt, params) -> token ids of that request run alone (memoised)."""
    memo: dict = {}

    def run(prompt: list[int], params: SamplingParams) -> list[int]:
        key = (tuple(prompt), repr(params))
        if key not in memo:
            out = ref_llm.generate([prompt], params)[0]
            assert len(out.outputs) == 1
            memo[key] = out.outputs[0].token_ids
        return memo[key]
    return run


def drive(engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]], max_steps: int = 5000):
    """Step an LLMEngine, adding requests before the step numbered by their key.
    Returns (final RequestOutput by request id, every step's outputs)."""
    final, history = {}, []
    step = 0
    while step <= max(arrivals, default=0) or engine.has_unfinished_requests():
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
        outs = engine.step()
        history.append(outs)
        for o in outs:
            assert o.request_id not in final, f"output for {o.request_id} after it finished"
            if o.finished:
                final[o.request_id] = o
        step += 1
        assert step < max_steps, "engine did not finish"
    return final, history


def assert_pool_idle(engine) -> None:
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.pool.num_free == engine.num_blocks, "blocks leaked"
    assert all(c == 0 for c in engine.pool.ref_cnt)


def count_preemptions(engine) -> list[str]:
    """Wrap the scheduler's _preempt so each preemption is recorded."""
    sched = engine.scheduler
    seen: list[str] = []
    orig = type(sched)._preempt

    def wrapper(req):
        seen.append(req.request_id)
        return orig(sched, req)
    sched._preempt = wrapper
    return seen


# -- 1, 2: batch invariance ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_batch_invariance_one_generate_call(llm, solo, kind):
    params = [GREEDY if kind == "greedy" else seeded(100 + i) for i in range(len(PROMPTS))]
    expected = [solo(p, sp) for p, sp in zip(PROMPTS, params)]
    outs = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(len(t) == 12 for t in expected)
    assert_pool_idle(llm.engine)


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_batch_invariance_requests_arriving_mid_run(llm, solo, kind):
    def sp(i):
        return GREEDY if kind == "greedy" else seeded(200 + i)
    reqs = [(f"{kind}-mid-{i}", p, sp(i)) for i, p in enumerate(PROMPTS)]
    arrivals = {0: reqs[:3], 3: reqs[3:5], 7: reqs[5:]}
    final, history = drive(llm.engine, arrivals)
    assert len(history) > 8
    for rid, prompt, params in reqs:
        assert final[rid].outputs[0].token_ids == solo(prompt, params), rid
    assert_pool_idle(llm.engine)


def test_unseeded_sampling_varies_and_seed_matters(llm, solo):
    prompt = PROMPTS[2]
    free = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True)
    a, b = (llm.generate([prompt], free)[0].outputs[0].token_ids for _ in range(2))
    assert a != b, "two unseeded sampled runs of 32 tokens gave the same tokens"
    s1, s2 = seeded(1, 24), seeded(2, 24)
    assert solo(prompt, s1) != solo(prompt, s2), "different seeds gave the same tokens"
    assert llm.generate([prompt], s1)[0].outputs[0].token_ids == solo(prompt, s1)
    assert solo(prompt, s1) != solo(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))


# -- 3: preemption ------------------------------------------------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
def test_preemption_gives_same_tokens(ckpt, solo, caching):
    # 16 blocks of 4 = 64 tokens: room for one full request (at most 20 + 30 tokens), never four.
    small = LLM(ckpt, dtype="float32", block_size=BS, num_blocks=16, enable_prefix_caching=caching)
    preempted = count_preemptions(small.engine)
    prompts = [make_prompt(n, salt=40 + k) for k, n in enumerate([20, 9, 14, 5, 17])]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True) if i % 2 == 0
              else SamplingParams(temperature=0.8, top_p=0.9, seed=300 + i, max_tokens=30, ignore_eos=True)
              for i in range(len(prompts))]
    outs = small.generate(prompts, params)
    assert preempted, "the tiny pool never preempted: the test does not exercise preemption"
    for prompt, sp, out in zip(prompts, params, outs):
        assert out.outputs[0].token_ids == solo(prompt, sp)
        assert out.outputs[0].finish_reason == "length"
    assert_pool_idle(small.engine)


# -- 4: chunked prefill ---------------------------------------------------------------------------------
def test_chunked_prefill_matches_large_budget(ckpt, solo):
    chunked = LLM(ckpt, dtype="float32", block_size=BS, num_blocks=256, max_num_batched_tokens=8)
    sched = chunked.engine.scheduler
    step_tokens: list[int] = []
    orig = sched.schedule

    def schedule():
        out = orig()
        step_tokens.append(out.total_num_tokens)
        return out
    sched.schedule = schedule
    prompts = [make_prompt(50, salt=7), make_prompt(23, salt=8), make_prompt(3, salt=9)]
    params = [GREEDY, seeded(400), GREEDY]
    outs = chunked.generate(prompts, params)
    assert max(step_tokens) <= 8
    assert sum(step_tokens) >= 50 + 23 + 3, "prompts were not all prefilled"
    for prompt, sp, out in zip(prompts, params, outs):
        assert out.outputs[0].token_ids == solo(prompt, sp)
    assert_pool_idle(chunked.engine)


# -- 5: prefix cache ------------------------------------------------------------------------------------
def test_prefix_cache_hits_and_frees_everything(llm, ref_llm):
    shared = make_prompt(37, salt=50)
    first, second = shared + [9, 10, 11], shared + [200, 201]
    cold = llm.generate([first], GREEDY)[0]
    warm = llm.generate([second], GREEDY)[0]
    assert warm.num_cached_tokens > 0, "the shared prefix was not served from the cache"
    assert warm.num_cached_tokens % BS == 0
    assert warm.num_cached_tokens == (37 // BS) * BS
    ref = ref_llm.generate([first, second], GREEDY)
    assert ref[1].num_cached_tokens == 0  # caching off
    assert cold.outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert warm.outputs[0].token_ids == ref[1].outputs[0].token_ids
    # the very same prompt again: everything but the last token's block can come from the cache
    again = llm.generate([second], GREEDY)[0]
    assert again.num_cached_tokens == ((len(second) - 1) // BS) * BS
    assert again.outputs[0].token_ids == ref[1].outputs[0].token_ids
    assert_pool_idle(llm.engine)


def test_prefix_cache_hit_on_a_running_request(llm, ref_llm):
    shared = make_prompt(30, salt=51)
    a, b = shared + [5], shared + [6, 7]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    final, _ = drive(llm.engine, {0: [("pc-a", a, params)], 3: [("pc-b", b, params)]})
    assert final["pc-b"].num_cached_tokens == (30 // BS) * BS
    ref = ref_llm.generate([a, b], params)
    assert final["pc-a"].outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert final["pc-b"].outputs[0].token_ids == ref[1].outputs[0].token_ids
    assert_pool_idle(llm.engine)


# -- 6: n > 1 ---------------------------------------------------------------------------------------------
def test_n3_sampled_choices_share_prompt_blocks(llm):
    engine = llm.engine
    prompt = make_prompt(41, salt=60)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=16, ignore_eos=True)
    engine.add_request("n3", prompt, params)
    children = list(engine.groups["n3"].children)
    used = []
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                final = o
        used.append(engine.num_blocks - engine.pool.num_free)
    assert [c.index for c in final.outputs] == [0, 1, 2]
    toks = [c.token_ids for c in final.outputs]
    assert all(len(t) == 16 for t in toks)
    assert not toks[0] == toks[1] == toks[2], "three sampled choices are identical"
    # siblings 1 and 2 reuse the prompt blocks that sibling 0 computed
    assert [c.num_cached_tokens for c in children[1:]] == [40, 40]
    unshared = 3 * -(-(41 + 16) // BS)
    assert max(used) < unshared, f"peak {max(used)} blocks: the prompt was not shared"
    assert_pool_idle(engine)


def test_n3_greedy_and_seeded(llm, solo):
    prompt = make_prompt(10, salt=61)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True))[0]
    toks = [c.token_ids for c in out.outputs]
    assert toks[0] == toks[1] == toks[2] == solo(prompt, SamplingParams(temperature=0, max_tokens=10,
                                                                       ignore_eos=True))
    sp = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=10, ignore_eos=True)
    a = [c.token_ids for c in llm.generate([prompt], sp)[0].outputs]
    b = [c.token_ids for c in llm.generate([prompt, make_prompt(30)], [sp, GREEDY])[0].outputs]
    assert a == b, "seeded n=3 is not reproducible"
    assert len({tuple(t) for t in a}) > 1


# -- 7: abort ---------------------------------------------------------------------------------------------
def test_abort_running_request(llm, solo):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    p = {"ab-a": make_prompt(9, 70), "ab-b": make_prompt(30, 71), "ab-c": make_prompt(15, 72)}
    for rid, prompt in p.items():
        engine.add_request(rid, prompt, params)
    for _ in range(4):
        engine.step()
    child = engine.groups["ab-b"].children[0]
    assert child.status is RequestStatus.RUNNING and len(child.output_token_ids) > 0
    blocks = list(child.block_ids)
    assert blocks
    free_before = engine.pool.num_free
    engine.abort_request("ab-b")
    assert all(engine.pool.ref_cnt[b] == 0 for b in blocks), "aborted request's blocks still referenced"
    assert engine.pool.num_free == free_before + len(blocks)
    assert child not in engine.scheduler.running
    final = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.request_id != "ab-b", "output emitted for an aborted request"
            if o.finished:
                final[o.request_id] = o
    assert set(final) == {"ab-a", "ab-c"}
    for rid in final:
        assert final[rid].outputs[0].token_ids == solo(p[rid], params)
    assert_pool_idle(engine)


def test_abort_waiting_and_unknown_request(llm):
    engine = llm.engine
    engine.add_request("ab-w", make_prompt(5, 73), GREEDY)
    engine.abort_request("ab-w")
    engine.abort_request("no-such-request")  # a no-op
    assert not engine.has_unfinished_requests()
    assert engine.step() == []
    assert_pool_idle(engine)


# -- 8: stop conditions -----------------------------------------------------------------------------------
def test_max_tokens_length(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7 and out.stop_reason is None


def test_stop_token_ids(llm, solo):
    base = solo(PROMPTS[3], GREEDY)
    tok = base[4]
    k = base.index(tok)
    out = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok]))[0]
    o = out.outputs[0]
    assert o.token_ids == base[:k + 1]
    assert o.finish_reason == "stop" and o.stop_reason == tok


def test_eos_min_tokens_and_ignore_eos(llm):
    prompt = PROMPTS[2]
    eos_likely = {EOS: 100.0}
    o = llm.generate([prompt], SamplingParams(temperature=0, logit_bias=eos_likely))[0].outputs[0]
    assert o.token_ids == [EOS] and o.finish_reason == "stop" and o.stop_reason == EOS
    o = llm.generate([prompt], SamplingParams(temperature=0, logit_bias=eos_likely, min_tokens=5))[0].outputs[0]
    assert len(o.token_ids) >= 5 and EOS not in o.token_ids[:5]
    assert o.token_ids[-1] == EOS and o.finish_reason == "stop"
    # sampled too: eos is banned, not merely unlikely
    o = llm.generate([prompt], SamplingParams(temperature=1.0, logit_bias=eos_likely, min_tokens=5,
                                              max_tokens=10))[0].outputs[0]
    assert len(o.token_ids) >= 5 and EOS not in o.token_ids[:5]
    # min_tokens also holds back stop_token_ids
    o = llm.generate([prompt], SamplingParams(temperature=0, logit_bias={77: 100.0}, stop_token_ids=[77],
                                              min_tokens=3, max_tokens=10))[0].outputs[0]
    assert 77 not in o.token_ids[:3] and o.token_ids[-1] == 77 and len(o.token_ids) == 4
    o = llm.generate([prompt], SamplingParams(temperature=0, logit_bias=eos_likely, ignore_eos=True,
                                              max_tokens=6))[0].outputs[0]
    assert o.token_ids == [EOS] * 6 and o.finish_reason == "length"


def test_stop_strings(llm, solo):
    prompt = PROMPTS[4]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    toks = solo(prompt, params)
    full = llm.generate([prompt], params)[0].outputs[0].text
    words = full.split()
    assert words == [f"t{t}" for t in toks]
    cases = [
        f"{words[3]} {words[4]}",           # two whole tokens
        f"{words[5][1:]} {words[6][:2]}",   # starts and ends inside tokens
    ]
    for stop in cases:
        cut = full.find(stop)
        assert cut > 0
        o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                  stop=[stop, "never-happens"]))[0].outputs[0]
        assert o.text == full[:cut], stop
        assert o.finish_reason == "stop" and o.stop_reason == stop
        assert o.token_ids == toks[:len(o.token_ids)] and len(o.token_ids) < 12
        o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop,
                                                  include_stop_str_in_output=True))[0].outputs[0]
        assert o.text == full[:cut + len(stop)]
        assert o.finish_reason == "stop" and o.stop_reason == stop


# -- 9: penalties, logit bias, filters ----------------------------------------------------------------------
def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


def test_logit_bias_forces_token(llm):
    o = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5, logit_bias={77: 100}))[0].outputs[0]
    assert o.token_ids == [77] * 5
    o = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=5, logit_bias={"78": 100}))[0]
    assert o.outputs[0].token_ids == [78] * 5


def test_penalties_reduce_repetition(llm, solo):
    # find a prompt where plain greedy repeats a lot
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = max(PROMPTS, key=lambda p: repeats(solo(p, base)))
    plain = solo(prompt, base)
    assert repeats(plain) >= 6, f"greedy does not repeat enough to test penalties: {plain}"
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw)
        pen = llm.generate([prompt], sp)[0].outputs[0].token_ids
        assert repeats(pen) < repeats(plain), (kw, pen, plain)
    # a negative presence penalty encourages repetition
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=-2.0)
    assert repeats(llm.generate([PROMPTS[1]], sp)[0].outputs[0].token_ids) >= repeats(solo(PROMPTS[1], base))


def test_top_k_1_and_min_p_1_equal_greedy(llm, solo):
    greedy = [solo(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)) for p in PROMPTS[:3]]
    for kw in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):
        sp = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, **kw)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], sp)]
        assert got == greedy, kw


# -- 10: logprobs -------------------------------------------------------------------------------------------
def test_logprobs_match_transformers(llm, ckpt):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompt = PROMPTS[3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))[0]
    o = out.outputs[0]
    assert len(o.logprobs) == 6
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + o.token_ids])).logits[0].float().log_softmax(-1)
    for k, (tok, lp) in enumerate(zip(o.token_ids, o.logprobs)):
        assert lp.token_id == tok and lp.token == f"t{tok}"
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        vals = [v for _, _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        assert lp.top[0][0] == tok and lp.logprob == pytest.approx(vals[0], abs=1e-6)  # greedy: chosen is best
        row = ref[len(prompt) - 1 + k]
        ref_v, ref_i = row.topk(3)
        assert [t for t, _, _ in lp.top] == ref_i.tolist()
        assert vals == pytest.approx(ref_v.tolist(), abs=1e-4)
        assert lp.logprob == pytest.approx(row[tok].item(), abs=1e-4)
    # sampled: the chosen token's logprob is its own, at most the best one's
    o = llm.generate([prompt], SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True,
                                              logprobs=2))[0].outputs[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + o.token_ids])).logits[0].float().log_softmax(-1)
    for k, (tok, lp) in enumerate(zip(o.token_ids, o.logprobs)):
        assert len(lp.top) == 2 and lp.logprob <= lp.top[0][2] + 1e-6
        assert lp.logprob == pytest.approx(ref[len(prompt) - 1 + k, tok].item(), abs=1e-4)
    # no logprobs asked: none given
    assert llm.generate([prompt], GREEDY)[0].outputs[0].logprobs is None


# -- 11: streaming deltas -----------------------------------------------------------------------------------
def test_streaming_deltas_n2(llm):
    engine = llm.engine
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=14, ignore_eos=True)
    text = {0: "", 1: ""}
    ids: dict[int, list[int]] = {0: [], 1: []}
    final, history = drive(engine, {0: [("stream", PROMPTS[2], params)]})
    for outs in history:
        for o in outs:
            for c in o.outputs:
                text[c.index] += c.delta_text
                ids[c.index] += c.delta_token_ids
    for c in final["stream"].outputs:
        assert len(c.token_ids) == 14
        assert ids[c.index] == c.token_ids
        assert text[c.index] == c.text and c.text
    assert final["stream"].outputs[0].token_ids != final["stream"].outputs[1].token_ids


def test_streaming_deltas_with_stop_string(llm, solo):
    engine = llm.engine
    prompt = PROMPTS[4]
    full_toks = solo(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop = f"t{full_toks[5]} t{full_toks[6]}"
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop)
    final, history = drive(engine, {0: [("stream-stop", prompt, params)]})
    deltas = [c.delta_text for outs in history for o in outs for c in o.outputs]
    o = final["stream-stop"].outputs[0]
    assert "".join(deltas) == o.text
    assert o.finish_reason == "stop" and stop not in o.text
    assert not any(stop in d for d in deltas)


# -- 12: bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1}, "temperature"),
    ({"n": 0}, "n="), ({"min_p": 2}, "min_p"), ({"logit_bias": {5: 1000}}, "logit_bias"),
])
def test_bad_sampling_params(kwargs, name):
    with pytest.raises(InvalidRequestError, match=name):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def short_llm(ckpt) -> LLM:
    return LLM(ckpt, dtype="float32", block_size=BS, num_blocks=64, max_model_len=64)


def test_bad_prompts_then_still_works(short_llm, solo):
    llm = short_llm
    assert llm.engine.max_model_len == 64
    cases = [
        ("", "empty"),
        ([[]], "empty"),
        ([], "non-empty"),
        ([make_prompt(64)], "64"),
        ([make_prompt(100)], "100 tokens"),
        ([[5, 6, 300]], "300"),
        ([[5, -1]], "-1"),
    ]
    for prompt, words in cases:
        with pytest.raises(InvalidRequestError, match=words):
            llm.generate(prompt, GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.engine.add_request("bad-empty", [], GREEDY)
    # a bad prompt after a good one in the same call: the good one is withdrawn
    with pytest.raises(InvalidRequestError):
        llm.generate([PROMPTS[1], [5, 999]], GREEDY)
    assert_pool_idle(llm.engine)
    # the longest prompt that fits gets one token
    o = llm.generate([make_prompt(63)], GREEDY)[0].outputs[0]
    assert len(o.token_ids) == 1 and o.finish_reason == "length"
    outs = llm.generate(PROMPTS[:3], GREEDY)
    assert [x.outputs[0].token_ids for x in outs] == [solo(p, GREEDY) for p in PROMPTS[:3]]
    assert_pool_idle(llm.engine)


@pytest.mark.parametrize("kwargs, name", [
    ({"stop_token_ids": [300], "min_tokens": 2}, "stop_token_ids"),
    ({"stop_token_ids": [-1], "min_tokens": 2}, "stop_token_ids"),
    ({"seed": 2**70}, "seed"),
])
def test_bad_request_fails_cleanly_and_engine_survives(ckpt, solo, kwargs, name):
    """A request the engine cannot run must be refused up front with a clear error, not blow up
    inside step() (which leaves it in the scheduler and makes every later step fail too)."""
    fresh = LLM(ckpt, dtype="float32", block_size=BS, num_blocks=64)
    with pytest.raises(InvalidRequestError, match=name):
        fresh.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=4, **kwargs))
    assert_pool_idle(fresh.engine)
    assert fresh.generate([PROMPTS[1]], GREEDY)[0].outputs[0].token_ids == solo(PROMPTS[1], GREEDY)


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty"])
def test_nan_sampling_params_rejected(name):
    # NaN slips through `x < 0` style checks; the sampler then turns every row into token 0
    with pytest.raises(InvalidRequestError, match=name):
        SamplingParams(**{name: float("nan")})


def test_max_model_len_over_model_limit(ckpt):
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        LLM(ckpt, dtype="float32", max_model_len=100_000)


def copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_missing_model_folder(tmp_path):
    path = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(path, dtype="float32")


def test_folder_without_config(ckpt, tmp_path):
    folder = copy_checkpoint(ckpt, str(tmp_path / "noconfig"))
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(folder, dtype="float32")


def test_unsupported_architecture_llama_shaped(ckpt, tmp_path):
    folder = copy_checkpoint(ckpt, str(tmp_path / "gpt2ish"))
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(folder, dtype="float32")


def test_unsupported_architecture_real_gpt2_config(ckpt, tmp_path):
    """A genuine GPT-2 config.json (n_embd, n_head, ... and no hidden_size) must be reported as an
    unsupported architecture, not as a config that lacks some Llama key."""
    import transformers
    folder = copy_checkpoint(ckpt, str(tmp_path / "gpt2"))
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=1).to_dict()
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(folder, dtype="float32")


def test_truncated_safetensors(ckpt, tmp_path):
    folder = copy_checkpoint(ckpt, str(tmp_path / "truncated"))
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LLM(folder, dtype="float32")


# -- 13: chat ------------------------------------------------------------------------------------------------
def test_chat_template(ckpt, tmp_path, solo):
    folder = copy_checkpoint(ckpt, str(tmp_path / "chat"))
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}t3{% endif %}")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    chat_llm = LLM(folder, dtype="float32", block_size=BS, num_blocks=64)
    messages = [{"role": "t2", "content": "t5 t6"}, {"role": "t4", "content": "t7 t8 t9"}]
    rendered = chat_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.split() == ["t2", "t5", "t6", "t4", "t7", "t8", "t9", "t3"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    out = chat_llm.chat(messages, params)[0]
    assert out.prompt_token_ids == [2, 5, 6, 4, 7, 8, 9, 3]
    gen = chat_llm.generate(rendered, params)[0]
    assert out.outputs[0].token_ids == gen.outputs[0].token_ids == solo([2, 5, 6, 4, 7, 8, 9, 3], params)
    assert out.outputs[0].text == gen.outputs[0].text
    # a batch of two conversations
    outs = chat_llm.chat([messages, messages[:1]], params)
    assert outs[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert outs[1].prompt_token_ids == [2, 5, 6, 3]
