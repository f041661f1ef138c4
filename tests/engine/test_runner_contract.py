"""The scheduler-to-runner contract is plain data: the runner works behind a queue of pickled bytes,
on a thread of its own, and the engine gives exactly the tokens it gives with the runner in place."""

from __future__ import annotations

import pickle
import queue
import threading

import pytest
import torch

from keel import LLM, SamplingParams
from keel.engine.outputs import CachedRequestData, NewRequestData
from tests.engine.test_engine import BS, make_prompt
from tests.models.conftest import make_checkpoint


class QueuedRunner:
    """A ModelRunner reached only through queues of pickled SchedulerOutput / RunnerOutput bytes: no
    object is shared between the engine and the runner's thread, as if it ran in another process."""

    def __init__(self, runner) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.steps: list = []  # every SchedulerOutput as the runner received it
        self.thread = threading.Thread(target=self._serve, args=(runner,), daemon=True)
        self.thread.start()

    def _serve(self, runner) -> None:
        torch.set_flush_denormal(True)  # a per-thread flag: the engine sets it on the thread that steps
        while (msg := self.inbox.get()) is not None:
            sched = pickle.loads(msg)
            self.steps.append(sched)
            try:
                self.outbox.put(pickle.dumps(("ok", runner.execute(sched))))
            except Exception as e:
                self.outbox.put(pickle.dumps(("error", e)))

    def execute(self, sched):
        self.inbox.put(pickle.dumps(sched))
        kind, value = pickle.loads(self.outbox.get(timeout=60))
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)


def behind_a_queue(llm: LLM) -> QueuedRunner:
    queued = QueuedRunner(llm.engine.runner)
    llm.engine.runner = queued
    return queued


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("contract_ckpt") / "llama-gqa")
    make_checkpoint(folder, "llama-gqa")
    return folder


def workload():
    prompts = [make_prompt(n, salt=k) for k, n in enumerate([5, 9, 21, 33, 47])]
    prompts.append(prompts[2][:16] + make_prompt(6, salt=9))  # shares whole blocks with another prompt
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=20, seed=11, max_tokens=12, ignore_eos=True,
                             repetition_penalty=1.2, presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, min_tokens=4),
              SamplingParams(temperature=0.9, seed=5, max_tokens=10, ignore_eos=True)]
    return prompts, params


def tokens_of(outs):
    return [[(list(c.token_ids), None if c.logprobs is None else [round(lp.logprob, 5) for lp in c.logprobs])
             for c in o.outputs] for o in outs]


@pytest.mark.parametrize("num_blocks", [512, 24])  # 24 blocks of 4 tokens: requests are preempted and resumed
def test_the_runner_behind_a_queue_gives_the_same_tokens(ckpt, num_blocks):
    prompts, params = workload()
    kw = dict(dtype="float32", block_size=BS, num_blocks=num_blocks, max_num_batched_tokens=32)
    expected = tokens_of(LLM(ckpt, **kw).generate(prompts, params))
    llm = LLM(ckpt, **kw)
    queued = behind_a_queue(llm)
    try:
        got = tokens_of(llm.generate(prompts, params))
        assert got == expected
        # and the same engine goes on serving through the queue
        assert tokens_of(llm.generate(prompts[:2], params[:2])) == expected[:2]
    finally:
        queued.close()
    news = [n for s in queued.steps for n in s.new_requests]
    cached = [c for s in queued.steps for c in s.cached_requests]
    assert news and cached and all(isinstance(n, NewRequestData) for n in news)
    assert all(isinstance(c, CachedRequestData) for c in cached)
    if num_blocks == 24:
        assert any(s.preempted_ids for s in queued.steps)  # the small cache did preempt
        resumed = [n for n in news if len(n.token_ids) > n.num_prompt_tokens]
        assert resumed, "a preempted request comes back whole, with the tokens it generated"
