"""The scheduler's adapter budget on plain Python objects (no torch): at most max_loras adapters among
running requests, loads never block other requests, and no adapter starves."""

from __future__ import annotations

from keel.config import SchedulerConfig
from keel.engine.block_pool import BlockPool
from keel.engine.outputs import RunnerOutput
from keel.engine.request import Request
from keel.engine.scheduler import Scheduler
from keel.sampling_params import SamplingParams


class FakeSlots:
    def __init__(self, max_loras: int, loading: set[int] = ()) -> None:
        self.max_loras = max_loras
        self.loading = set(loading)
        self.asked: list[int] = []

    def is_ready(self, adapter_id: int) -> bool:
        self.asked.append(adapter_id)
        return adapter_id not in self.loading


def make(max_loras=2, loading=(), max_seqs=16):
    slots = FakeSlots(max_loras, loading)
    s = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=256), BlockPool(256), 4, slots)
    return s, slots


ADAPTER_OF: dict[str, int | None] = {}


def req(rid, adapter, max_tokens=4, n_prompt=3):
    ADAPTER_OF[rid] = adapter
    return Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens), eos_token_ids=(1,),
                   max_tokens=max_tokens, adapter_id=adapter)


def step(s):
    out = s.schedule()
    s.update_from_output(out, RunnerOutput({rid: 99 for rid in out.sampling_ids}))
    return out


def adapters_of(out):
    return {ADAPTER_OF[rid] for rid in out.scheduled_ids if ADAPTER_OF[rid] is not None}


def test_budget_caps_distinct_adapters_and_base_requests_are_free():
    s, _ = make(max_loras=2)
    for i, a in enumerate([1, 2, 3, None, 1, 3]):
        s.add_request(req(f"r{i}", a))
    out = step(s)
    assert out.scheduled_ids == ["r0", "r1", "r3", "r4"]
    assert out.adapter_ids_in_use == {1, 2}
    while s.has_unfinished():
        out = step(s)
        assert len(out.adapter_ids_in_use) <= 2 and len(adapters_of(out)) <= 2
    assert not s.requests


def test_a_loading_adapter_does_not_block_later_requests():
    s, slots = make(max_loras=2, loading={7})
    s.add_request(req("cold", 7))
    s.add_request(req("warm", 1))
    out = step(s)
    assert out.scheduled_ids == ["warm"] and 7 in slots.asked
    slots.loading.clear()
    out = step(s)
    assert "cold" in out.scheduled_ids


def test_no_starvation_under_a_stream_of_popular_requests():
    """Adapters 1 and 2 always have new requests; adapter 3 still gets a slot within a bounded wait."""
    s, _ = make(max_loras=2, max_seqs=64)
    s.add_request(req("p1-0", 1, max_tokens=6))
    s.add_request(req("p2-0", 2, max_tokens=3))
    step(s)
    s.add_request(req("rare", 3))
    started, drained = None, set()
    for k in range(1, 40):
        s.add_request(req(f"p1-{k}", 1, max_tokens=6))
        s.add_request(req(f"p2-{k}", 2, max_tokens=3))
        out = step(s)
        drained.add(s.draining)
        assert len(out.adapter_ids_in_use) <= 2
        if "rare" in out.scheduled_ids:
            started = k
            break
    # bounded by one drained adapter's longest request (6 tokens), not by the stream of popular requests
    assert started is not None and started <= 8, started
    assert drained - {None}


def test_preempted_request_of_draining_adapter_is_readmitted():
    s, _ = make(max_loras=1)
    s.add_request(req("a", 1, max_tokens=8))
    step(s)
    s.add_request(req("b", 2))
    step(s)
    assert s.draining == 1
    # a preempted request of the draining adapter may come back (it was running already)
    victim = s.running.pop()
    s._preempt(victim)
    out = step(s)
    assert out.scheduled_ids == ["a"]
