"""The synchronous engine: requests in, one scheduler step and one model step at a time, outputs out."""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass

import torch

from keel.config import CacheConfig, SchedulerConfig
from keel.engine.block_pool import BlockPool
from keel.engine.detokenizer import IncrementalDetokenizer
from keel.engine.device import parse_dtype, pick_device
from keel.engine.model_runner import ModelRunner
from keel.engine.request import Request
from keel.engine.scheduler import Scheduler
from keel.errors import InvalidRequestError
from keel.models.loader import DEFAULT_MODEL_NAME, build_model, open_checkpoint, resolve_model
from keel.outputs import CompletionOutput, Logprob, RequestOutput
from keel.sampling_params import SamplingParams

log = logging.getLogger("keel")


@dataclass
class _Group:
    """One user request: n sequences sharing a prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    outputs: list[CompletionOutput]
    want_logprobs: bool


class LLMEngine:
    def __init__(self, model: str | None = None, *, dtype=None, device: str | None = None,
                 cache: CacheConfig | None = None, scheduler: SchedulerConfig | None = None,
                 max_model_len: int | None = None) -> None:
        self.device = pick_device(device)
        if self.device.type == "cpu":
            # Denormal floats (common in attention and small activations) make x86 float math 10-50x
            # slower; flushing them to zero changes results by less than float32 rounding does.
            torch.set_flush_denormal(True)
        self.dtype = parse_dtype(dtype, self.device)
        self.model_path = resolve_model(model)
        ckpt = open_checkpoint(self.model_path)
        self.model_name = DEFAULT_MODEL_NAME if model is None else ckpt.name
        self.model_config = cfg = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.checkpoint_files = ckpt.files
        self.cache_config = cache = cache or CacheConfig()
        sched_cfg = scheduler or SchedulerConfig()
        limit = cfg.max_position_embeddings
        if cfg.sliding_window:
            limit = min(limit, cfg.sliding_window)  # within the window, full attention is exact
        if max_model_len is not None:
            if max_model_len > limit:
                raise InvalidRequestError(f"max_model_len={max_model_len} is over this model's limit of {limit}")
            limit = max_model_len
        per_token = ModelRunner.kv_bytes_per_token(cfg, self.dtype)
        num_blocks = cache.num_blocks
        if num_blocks is None:
            by_memory = int(cache.kv_cache_memory_gb * 2**30) // (per_token * cache.block_size)
            needed = sched_cfg.max_num_seqs * -(-limit // cache.block_size)
            num_blocks = max(1, min(by_memory, needed))
        # A single request must always fit in the cache, or preemption could never make room for it.
        self.max_model_len = min(limit, num_blocks * cache.block_size)
        sched_cfg.max_model_len = self.max_model_len
        self.num_blocks = num_blocks
        self.scheduler_config = sched_cfg

        self.model = build_model(ckpt, self.dtype, self.device, self.max_model_len)
        if self.device.type == "cpu":
            self.model.pack_for_cpu()
        self.pool = BlockPool(num_blocks, cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.pool, cache.block_size)
        self.runner = ModelRunner(self.model, num_blocks, cache.block_size, self.dtype, self.device)
        self.groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, tuple[_Group, int]] = {}
        self._ids = itertools.count()
        log.info("loaded %s (%s, %s): %d KV blocks of %d tokens, max_model_len %d", self.model_name,
                 self.device, self.dtype, num_blocks, cache.block_size, self.max_model_len)

    # -- requests --------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter_id: int | None = None) -> None:
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if not ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        self._check_token_ids(params)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens, but this model's context is {self.max_model_len} tokens "
                f"(prompt plus at least one generated token)")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = tuple(self.model_config.eos_token_ids or self.tokenizer.eos_token_ids)
        children, detoks, outputs = [], [], []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None:
                p = copy.copy(params)
                p.seed = params.seed + i  # each choice its own stream, still reproducible
            child = Request(f"{request_id}#{i}", ids, p, eos, max_tokens, adapter_id,
                            wait_for=f"{request_id}#0" if i else None)
            children.append(child)
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=p.skip_special_tokens,
                                                 stop=p.stop_list, include_stop_str_in_output=p.include_stop_str_in_output))
            outputs.append(CompletionOutput(i, "", [], logprobs=[] if p.logprobs is not None else None))
        group = _Group(request_id, text, ids, children, detoks, outputs, params.logprobs is not None)
        self.groups[request_id] = group
        for i, child in enumerate(children):
            self._child_to_group[child.request_id] = (group, i)
            self.scheduler.add_request(child)

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or {}))):
            for t in ids:
                try:
                    ok = 0 <= int(t) < vocab
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise InvalidRequestError(f"{name} has token id {t!r}, outside the vocabulary [0, {vocab})")

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            self.scheduler.abort_request(child.request_id)
            self._child_to_group.pop(child.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        out = self.runner.execute(sched)
        updated = self.scheduler.update_from_output(sched, out)
        touched: dict[str, _Group] = {}
        for req in updated:
            group, i = self._child_to_group[req.request_id]
            touched[group.request_id] = group
            tok = req.output_token_ids[-1]
            # A stop or end-of-sequence token ends the text without appearing in it (as in vLLM)
            hidden = req.finished and req.stop_reason == tok and not req.params.include_stop_str_in_output
            stop = None if hidden else group.detoks[i].update([tok])
            if stop is not None and not req.finished:
                self.scheduler.finish_request(req.request_id, "stop", stop)
            elif stop is not None:
                req.finish_reason, req.stop_reason = "stop", stop
            o = group.outputs[i]
            o.token_ids.append(tok)
            o.delta_token_ids.append(tok)
            lp = out.logprobs.get(req.request_id)
            if lp is not None and o.logprobs is not None:
                o.logprobs.append(self._logprob(tok, lp))
            if req.finished:
                group.detoks[i].finish()
                o.finish_reason, o.stop_reason = req.finish_reason, req.stop_reason
        results = []
        for group in touched.values():
            results.append(self._emit(group))
        return results

    def _logprob(self, tok: int, lp) -> Logprob:
        dec = self.tokenizer.decode
        return Logprob(tok, dec([tok], skip_special_tokens=False), lp.logprob,
                       [(t, dec([t], skip_special_tokens=False), v) for t, v in lp.top])

    def _emit(self, group: _Group) -> RequestOutput:
        outs = []
        for i, o in enumerate(group.outputs):
            det = group.detoks[i]
            o.text = det.output_text
            o.delta_text = det.get_delta()
            snap = copy.copy(o)
            snap.token_ids = list(o.token_ids)
            snap.logprobs = None if o.logprobs is None else list(o.logprobs)
            outs.append(snap)
            o.delta_token_ids = []
        finished = all(o.finished for o in group.outputs)
        if finished:
            self.groups.pop(group.request_id, None)
            for child in group.children:
                self._child_to_group.pop(child.request_id, None)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, finished,
                             group.children[0].num_cached_tokens)
