"""Continuous batching: which requests run each step, and how many of their tokens. Torch-free.

Each step spends a token budget on running requests first (one token each when decoding, the next
chunk of a long prompt otherwise), then admits waiting requests in arrival order, prefilling their
prompts in chunks when the budget runs short. When the KV cache has no free block, the most recently
admitted running request is preempted: its blocks are freed and it is recomputed later from its
prompt and the tokens it already generated.

With LoRA adapters, the running requests use at most `max_loras` distinct adapters (the resident
slots). A waiting request of another adapter is admitted when a slot is free and its adapter is loaded
in host memory; until it is loaded (in the background) later requests go ahead. When the oldest
request that could run finds every slot taken, one running adapter is drained: its running requests
finish, but no new ones of it are admitted until the slot has gone to the waiting adapter. So popular
adapters cannot keep a slot forever and every adapter gets one in arrival order.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Protocol

from keel.config import SchedulerConfig
from keel.engine.block_pool import BlockPool, hash_block
from keel.engine.outputs import CachedRequestData, NewRequestData, RunnerOutput, SchedulerOutput
from keel.engine.request import Request, RequestStatus


class AdapterSlots(Protocol):
    """What the scheduler needs from the adapter manager (keel.lora.manager.LoRAManager)."""
    max_loras: int  # distinct adapters that can be resident at once

    def is_ready(self, adapter_id: int) -> bool:
        """True when the adapter can be made resident now; otherwise starts loading it."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, block_size: int,
                 adapters: AdapterSlots | None = None) -> None:
        self.config = config
        self.pool = pool
        self.block_size = block_size
        self.adapters = adapters
        self.draining: int | None = None  # running adapter that admits no new requests, to free its slot
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []

    # -- requests in and out ---------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        self.requests.pop(req.request_id, None)
        self._finished_ids.append(req.request_id)

    def finish_request(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request for a reason found outside the scheduler (a stop string)."""
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self._finish(req, reason, stop_reason)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput([], [], {})

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            known = len(req.block_ids)
            while not self._allocate(req, req.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            out.cached_requests.append(CachedRequestData(req.request_id, tuple(req.block_ids[known:]),
                                                         req.num_computed_tokens))
            self._scheduled(out, req, num_new)
            budget -= num_new
            i += 1

        if not out.preempted_ids:
            budget = self._admit_waiting(budget, out)

        out.adapter_ids_in_use = {r.adapter_id for r in self.running if r.adapter_id is not None}
        out.finished_ids = self._finished_ids
        self._finished_ids = []
        return out

    @staticmethod
    def _scheduled(out: SchedulerOutput, req: Request, num_new: int) -> None:
        out.num_scheduled_tokens[req.request_id] = num_new
        if req.num_computed_tokens + num_new == req.num_tokens:
            out.sampling_ids.add(req.request_id)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        in_use = Counter(r.adapter_id for r in self.running if r.adapter_id is not None)
        blocked = False  # a request found every adapter slot taken
        scanned_all = True
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                scanned_all = False
                break
            if req.wait_for is not None and self._sibling_pending(req.wait_for):
                continue
            aid = req.adapter_id
            if aid is not None and self.adapters is not None:
                if aid not in in_use:
                    if not self.adapters.is_ready(aid):
                        continue  # loading in the background; later requests go ahead meanwhile
                    if len(in_use) >= self.adapters.max_loras:
                        blocked = True
                        continue
                elif aid == self.draining and req.status is not RequestStatus.PREEMPTED:
                    continue
            hits: list[int] = []
            if req.num_computed_tokens == 0:
                self._update_hashes(req)
                # Always leave at least one token to compute: its logits give the next token.
                max_hit_blocks = (req.num_tokens - 1) // self.block_size
                hits = self.pool.lookup_prefix(req.block_hashes[:max_hit_blocks])
                self.pool.touch(hits)
                req.block_ids = list(hits)
                req.num_computed_tokens = len(hits) * self.block_size
                req.num_cached_blocks = len(hits)
                if req.num_preemptions == 0:
                    req.num_cached_tokens = req.num_computed_tokens
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._allocate(req, req.num_computed_tokens + num_new):
                self.pool.free(req.block_ids)
                req.block_ids, req.num_computed_tokens, req.num_cached_blocks = [], 0, 0
                scanned_all = False
                break
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.new_requests.append(NewRequestData(
                req.request_id, tuple(req.prompt_token_ids) + tuple(req.output_token_ids), req.num_prompt_tokens,
                req.params, req.eos_token_ids, req.adapter_id, tuple(req.block_ids), req.num_computed_tokens))
            self._scheduled(out, req, num_new)
            budget -= num_new
            if aid is not None:
                in_use[aid] += 1
        if not blocked:
            if scanned_all:
                self.draining = None
        elif self.draining not in in_use:
            # The adapter with the fewest running requests frees its slot soonest.
            self.draining = min(in_use, key=lambda a: (in_use[a], a))
        return budget

    def _sibling_pending(self, sibling_id: str) -> bool:
        sib = self.requests.get(sibling_id)
        return sib is not None and sib.num_computed_tokens < sib.num_prompt_tokens

    def _allocate(self, req: Request, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(req.block_ids)
        if need <= 0:
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        req.block_ids.extend(blocks)
        return True

    def _preempt(self, req: Request) -> None:
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_cached_blocks = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def _update_hashes(self, req: Request) -> None:
        """Extend req.block_hashes over every full block of its known tokens."""
        bs = self.block_size
        for k in range(len(req.block_hashes), req.num_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes.append(hash_block(parent, req.tokens(k * bs, (k + 1) * bs), req.adapter_id))

    # -- after the model ran ---------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, out: RunnerOutput) -> list[Request]:
        """Advance progress, append sampled tokens, finish requests that hit a stop. Returns the
        requests that got a new token this step (finished ones included)."""
        updated = []
        for rid, num_tokens in sched.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += num_tokens
            self._cache_full_blocks(req)
            tok = out.sampled_token_ids.get(req.request_id)
            if tok is None:
                continue
            req.output_token_ids.append(tok)
            updated.append(req)
            self._check_stop(req, tok)
        return updated

    def _cache_full_blocks(self, req: Request) -> None:
        if not self.pool.enable_caching:
            return
        full = req.num_computed_tokens // self.block_size
        if full <= req.num_cached_blocks:
            return
        self._update_hashes(req)
        for k in range(req.num_cached_blocks, full):
            self.pool.cache_block(req.block_ids[k], req.block_hashes[k])
        req.num_cached_blocks = full

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        n_out = len(req.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in req.eos_token_ids:
                return self._finish(req, "stop", tok)
            if tok in p.stop_token_ids:
                return self._finish(req, "stop", tok)
        if n_out >= req.max_tokens:
            self._finish(req, "length")
