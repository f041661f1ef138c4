"""The scheduler on plain Python objects: budgets, chunked prefill, preemption, prefix reuse, stops."""

from keel.config import SchedulerConfig
from keel.engine.block_pool import BlockPool
from keel.engine.outputs import RunnerOutput
from keel.engine.request import Request, RequestStatus
from keel.engine.scheduler import Scheduler
from keel.sampling_params import SamplingParams

BS = 4


def make(num_blocks=16, budget=64, max_seqs=8, caching=True):
    pool = BlockPool(num_blocks, caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), pool, BS), pool


def req(rid, n_prompt, max_tokens=8, first=10, **kw):
    return Request(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=(1,), max_tokens=max_tokens)


def run_step(s, tokens=None):
    out = s.schedule()
    sampled = {rid: (tokens or {}).get(rid, 99) for rid in out.sampling_ids}
    s.update_from_output(out, RunnerOutput(sampled))
    return out


def test_prefill_then_decode_with_exact_blocks():
    s, pool = make()
    s.add_request(req("a", 6))
    s.add_request(req("b", 3))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 6, "b": 3}
    assert s.requests["a"].block_ids == [0, 1] and s.requests["b"].block_ids == [2]
    s.update_from_output(out, RunnerOutput({"a": 50, "b": 51}))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}  # decode: one token each
    s.update_from_output(out, RunnerOutput({"a": 52, "b": 53}))
    # b now has 5 tokens: its next decode needs a second block
    out = s.schedule()
    assert s.requests["b"].block_ids == [2, 3]


def test_token_budget_chunks_long_prompt_and_decode_goes_first():
    s, _ = make(budget=8)
    s.add_request(req("a", 3))
    run_step(s)
    s.add_request(req("long", 20))
    out = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "long": 7}
    assert [rid in out.sampling_ids for rid in out.scheduled_ids] == [True, False]  # a partial prefill samples nothing
    out = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "long": 7}
    out = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "long": 6} and "long" in out.sampling_ids
    assert s.requests["long"].output_token_ids == [99]


def test_max_num_seqs_limits_admission():
    s, _ = make(max_seqs=2)
    for r in "abc":
        s.add_request(req(r, 2))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["a", "b"] and s.num_waiting == 1


def test_preemption_frees_last_admitted_and_recomputes_it():
    s, pool = make(num_blocks=4)
    s.add_request(req("a", 4, max_tokens=20))
    s.add_request(req("b", 4, max_tokens=20, first=40))
    run_step(s)  # a: blocks [0], b: [1]
    run_step(s)  # each has 5 tokens computed... a gets [0,2], b gets [1,3]
    assert s.requests["a"].block_ids == [0, 2] and s.requests["b"].block_ids == [1, 3]
    for _ in range(3):
        run_step(s)
    # a now needs a third block and none is free: b (last admitted) is preempted
    out = s.schedule()
    assert out.preempted_ids == ["b"]
    b = s.requests["b"]
    assert b.status is RequestStatus.PREEMPTED and b.block_ids == [] and b.num_computed_tokens == 0
    assert s.waiting[0] is b and len(b.output_token_ids) == 5  # generated tokens are kept
    assert out.num_scheduled_tokens == {"a": 1}


def test_finished_request_frees_blocks_and_is_reported():
    s, pool = make()
    s.add_request(req("a", 4, max_tokens=2))
    run_step(s)
    run_step(s)
    assert s.requests.get("a") is None and pool.num_free == 16
    out = s.schedule()
    assert out.finished_ids == ["a"] and not s.has_unfinished()


def test_stop_on_eos_respects_min_tokens_and_ignore_eos():
    s, _ = make()
    s.add_request(req("a", 2, max_tokens=10, min_tokens=2))
    s.add_request(req("b", 2, max_tokens=10, first=30, ignore_eos=True))
    r = {k: s.requests[k] for k in "ab"}
    run_step(s, {"a": 1, "b": 1})
    assert not r["a"].finished and not r["b"].finished  # a: below min_tokens
    run_step(s, {"a": 1, "b": 1})
    assert r["a"].finish_reason == "stop" and r["a"].stop_reason == 1
    assert not r["b"].finished


def test_stop_token_ids_and_length():
    s, _ = make()
    s.add_request(req("a", 2, max_tokens=10, stop_token_ids=[77]))
    s.add_request(req("b", 2, max_tokens=2, first=30))
    ra, rb = s.requests["a"], s.requests["b"]
    run_step(s, {"a": 77, "b": 5})
    run_step(s, {"b": 5})
    assert (ra.finish_reason, ra.stop_reason) == ("stop", 77)
    assert rb.finish_reason == "length" and rb.output_token_ids == [5, 5]


def test_prefix_cache_reuses_computed_blocks_only():
    s, pool = make()
    s.add_request(req("a", 10))
    run_step(s)  # 10 tokens computed: blocks 0, 1 full and cached, block 2 partial
    s.add_request(req("b", 9))  # same first 9 tokens
    out = s.schedule()
    b = s.requests["b"]
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == [0, 1]
    assert out.num_scheduled_tokens["b"] == 1
    assert pool.ref_cnt[0] == 2 and pool.ref_cnt[1] == 2


def test_whole_prompt_cached_still_computes_last_token():
    s, _ = make()
    s.add_request(req("a", 8))
    run_step(s)
    s.add_request(req("b", 8))
    out = s.schedule()
    assert s.requests["b"].num_cached_tokens == 4 and out.num_scheduled_tokens["b"] == 4


def test_sibling_waits_for_prompt_then_shares_it():
    s, _ = make(budget=4)
    a = req("x#0", 8)
    b = req("x#1", 8)
    b.wait_for = "x#0"
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"x#0": 4}
    s.update_from_output(out, RunnerOutput({}))
    out = run_step(s)
    assert out.num_scheduled_tokens == {"x#0": 4}
    out = s.schedule()
    assert out.num_scheduled_tokens == {"x#0": 1, "x#1": 3}  # x#1 reuses block 0 and recomputes the last block
    assert b.num_cached_tokens == 4


def test_abort_waiting_and_running():
    s, pool = make()
    s.add_request(req("a", 4))
    run_step(s)
    s.add_request(req("b", 4))
    s.abort_request("a")
    s.abort_request("b")
    assert not s.has_unfinished() and pool.num_free == 16
    assert s.schedule().finished_ids == ["a", "b"]
