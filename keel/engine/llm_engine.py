"""The synchronous engine: requests in, one scheduler step and one model step at a time, outputs out."""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass

import torch

from keel.config import CacheConfig, LoRAConfig, SchedulerConfig
from keel.engine.block_pool import BlockPool
from keel.engine.detokenizer import IncrementalDetokenizer
from keel.engine.device import parse_dtype, pick_device
from keel.engine.guided import GrammarBackend, fill_bitmask
from keel.engine.model_runner import ModelRunner
from keel.engine.request import Request
from keel.engine.scheduler import Scheduler
from keel.errors import InvalidRequestError, LoRAError
from keel.models.loader import DEFAULT_MODEL_NAME, build_model, open_checkpoint, resolve_model
from keel.outputs import CompletionOutput, Logprob, RequestOutput
from keel.quant.config import parse_quantization
from keel.quant.config import resolve as resolve_quantization
from keel.quant.convert import weight_bytes
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
    adapter_id: int | None = None


WEIGHT_DTYPES = ("auto", "bfloat16", "model")


class LLMEngine:
    def __init__(self, model: str | None = None, *, dtype=None, device: str | None = None,
                 cache: CacheConfig | None = None, scheduler: SchedulerConfig | None = None,
                 max_model_len: int | None = None, quantization=None, lora: LoRAConfig | None = None,
                 weight_dtype: str = "auto", kernels: str | None = None, cpu_isa: str | None = None,
                 batch_invariant: bool = True) -> None:
        """quantization: "int8", "int4" or a keel.quant.QuantConfig (weight-only, at load; a checkpoint
        written by `keel quantize` is quantized already and needs none); "gguf" keeps a GGUF file's
        Q4_0/Q4_1/Q8_0 blocks as they are, "none" dequantizes them; None: "gguf" for a GGUF file with such
        blocks where keel's CPU kernels serve a float32 model (see default_gguf_quantization), else none.
        lora: serve LoRA adapters (see add_lora); None: base model only.
        weight_dtype: "auto", "bfloat16" or "model": see keel.LLM.
        kernels ("auto", "keel", "torch"), cpu_isa ("auto", "avx2", "avx512"), batch_invariant: which code
        computes each layer, chosen once here (keel.kernels.backend)."""
        if weight_dtype not in WEIGHT_DTYPES:
            raise InvalidRequestError(f"weight_dtype={weight_dtype!r} is invalid: use one of {', '.join(WEIGHT_DTYPES)}")
        self.weight_dtype = weight_dtype
        self.device = pick_device(device)
        if self.device.type == "cpu":
            # Denormal floats (common in attention and small activations) make x86 float math 10-50x
            # slower; flushing them to zero changes results by less than float32 rounding does.
            torch.set_flush_denormal(True)
        self.dtype = parse_dtype(dtype, self.device)
        from keel.kernels.backend import choose
        self.backend = choose(self.device, self.dtype, kernels, cpu_isa, batch_invariant)
        auto_quantization = quantization is None
        quantization = parse_quantization(quantization)
        self.model_path = resolve_model(model)
        ckpt = open_checkpoint(self.model_path)
        if auto_quantization:
            from keel.quant.gguf_blocks import default_gguf_quantization
            quantization = default_gguf_quantization(ckpt, self.device, self.dtype, self.backend)
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
        self.model = build_model(ckpt, self.dtype, self.device, limit, quantization)
        self.quantization = resolve_quantization(ckpt.quantization, quantization, ckpt.name)
        self.model.prepare(self.backend, weight_dtype)

        from keel.engine.memory import kv_cache_blocks
        per_token = ModelRunner.kv_bytes_per_token(cfg, self.dtype)
        num_blocks, sized = kv_cache_blocks(cache, sched_cfg.max_num_seqs, limit, per_token, self.device)
        # A single request must always fit in the cache, or preemption could never make room for it.
        self.max_model_len = min(limit, num_blocks * cache.block_size)
        sched_cfg.max_model_len = self.max_model_len
        self.num_blocks = num_blocks
        self.kv_cache_sized = sized
        self.scheduler_config = sched_cfg
        self.lora = None
        if lora is not None:
            from keel.lora.manager import LoRAManager
            self.lora = LoRAManager(self.model, lora, self.dtype, self.device, served_model=self.model_name)
        self.pool = BlockPool(num_blocks, cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.pool, cache.block_size, adapters=self.lora)
        self.runner = ModelRunner(self.model, num_blocks, cache.block_size, self.dtype, self.device, lora=self.lora)
        self.structured = GrammarBackend(self.tokenizer, cfg.vocab_size)
        self.groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, tuple[_Group, int]] = {}
        self._ids = itertools.count()
        log.info("loaded %s (%s, %s%s): %d KV blocks of %d tokens, max_model_len %d", self.model_name,
                 self.device, self.dtype, f", {self.quantization.describe()}" if self.quantization else "",
                 num_blocks, cache.block_size, self.max_model_len)
        log.info("KV cache: %d tokens, %.0f MiB (%s): %d full-length sequences fit", num_blocks * cache.block_size,
                 num_blocks * cache.block_size * per_token / 2**20, sized,
                 num_blocks * cache.block_size // self.max_model_len)
        log.info("kernels: %s", self.backend.describe())
        for kind, impl in self.backend.table().items():  # `keel serve` prints them in its summary
            log.debug("  %-14s %s", kind, impl)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of model weights held in memory: "total", and by part ("projections", "embedding",
        "head", "other"), as packed or quantized for this device."""
        return weight_bytes(self.model)

    # -- requests --------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter_id: int | None = None, adapter: str | None = None) -> None:
        """adapter: a registered LoRA adapter's name (or adapter_id, its id); neither: the base model.
        An adapter that is not registered raises LoRANotFoundError, one that fails validation LoRAError."""
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        adapter_id = self._resolve_adapter(adapter, adapter_id)
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
        self._check_against_model(params)
        guide = self.structured.guide_for(params) if params.structured else None  # a bad schema raises here
        lazy = params.grammar_trigger is not None
        if lazy:
            guide = None  # the grammar is checked; it starts when the output shows the trigger
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
                            wait_for=f"{request_id}#0" if i else None,
                            guide=(guide if i == 0 else self.structured.guide_for(p)) if guide else None,
                            trigger_scan=0 if lazy else -1)
            children.append(child)
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=p.skip_special_tokens,
                                                 stop=p.stop_list, include_stop_str_in_output=p.include_stop_str_in_output))
            outputs.append(CompletionOutput(i, "", [], logprobs=[] if p.logprobs is not None else None))
        group = _Group(request_id, text, ids, children, detoks, outputs, params.logprobs is not None,
                       adapter_id)
        if adapter_id is not None:
            self.lora.acquire(adapter_id)
        self.groups[request_id] = group
        for i, child in enumerate(children):
            self._child_to_group[child.request_id] = (group, i)
            self.scheduler.add_request(child)

    def _check_against_model(self, params: SamplingParams) -> None:
        """The parameters whose valid range depends on the model: token ids and top_k."""
        vocab = self.model_config.vocab_size
        if params.top_k > vocab:
            raise InvalidRequestError(f"top_k={params.top_k} is invalid: this model has {vocab} tokens, so top_k "
                                      f"can be at most {vocab} (or 0 / -1 for all of them)", "top_k")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or {}))):
            for t in ids:
                try:
                    ok = 0 <= int(t) < vocab
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise InvalidRequestError(f"{name} has token id {t!r}, outside the vocabulary [0, {vocab})", name)

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            self.scheduler.abort_request(child.request_id)
            self._child_to_group.pop(child.request_id, None)
        if group.adapter_id is not None:
            self.lora.release(group.adapter_id)

    def expire_request(self, request_id: str) -> RequestOutput | None:
        """End a request now with finish_reason "length" and return its final output (None: unknown)."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        for i, child in enumerate(group.children):
            if group.outputs[i].finish_reason is None:
                self.scheduler.finish_request(child.request_id, "length")
                group.outputs[i].finish_reason = "length"
                group.detoks[i].finish()
        return self._emit(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.device.type == "cpu":
            # The flag lives in a per-thread register: set it on whichever thread steps (the server's
            # engine thread is not the one that built the engine), or that thread runs 2x slower and
            # its tokens can differ from the offline API's.
            torch.set_flush_denormal(True)
        failed = self._fail_adapter_requests() if self.lora is not None else []
        sched = self.scheduler.schedule()
        if self.lora is not None and not sched.num_scheduled_tokens and self.scheduler.has_unfinished():
            self.lora.wait_for_loads(0.05)  # every waiting request waits on an adapter load
        try:
            self._fill_grammar_masks(sched)
            out = self.runner.execute(sched)
            updated = self.scheduler.update_from_output(sched, out)
        except Exception as e:  # a failure of the whole step: its requests end, the engine goes on
            log.exception("step failed; ending the %d requests in it", len(sched.num_scheduled_tokens))
            in_step = [self._child_to_group.get(rid) for rid in sched.num_scheduled_tokens]
            groups = {entry[0].request_id: entry[0] for entry in in_step if entry is not None}
            return failed + [self._fail_group(g, e) for g in groups.values()]
        touched: dict[str, _Group] = {}
        broken: dict[str, tuple[_Group, Exception]] = {}
        for req in updated:
            group, i = self._child_to_group[req.request_id]
            error = out.errors.get(req.request_id)
            if error is None:
                try:
                    self._take_token(req, group, i, out)
                except Exception as e:  # detokenizing, stop strings, grammar: this request's own failure
                    log.exception("request %s failed after sampling", req.request_id)
                    error = e
            if error is not None:
                broken[group.request_id] = (group, error)
            touched[group.request_id] = group
        results = failed
        for rid, group in touched.items():
            if rid in broken:
                results.append(self._fail_group(*broken[rid]))
                continue
            try:
                results.append(self._emit(group))
            except Exception as e:
                log.exception("request %s failed while its output was built", rid)
                results.append(self._fail_group(group, e))
        return results

    def _fill_grammar_masks(self, sched) -> None:
        """The allowed-token bitmask of every request that samples this step under a grammar."""
        for rid in sched.sampling_ids:
            req = self.scheduler.requests.get(rid)
            if req is not None and req.guide is not None:
                sched.grammar_bitmask[rid] = fill_bitmask(req.guide, self.model_config.vocab_size)

    def _take_token(self, req: Request, group: _Group, i: int, out) -> None:
        """Record the token `req` sampled this step: grammar, detokenizer, stop strings, logprobs."""
        tok = req.output_token_ids[-1]
        if req.guide is not None and not req.finished:
            self._advance_guide(req, tok)
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
        if req.trigger_scan >= 0 and not req.finished:
            self._check_trigger(req, group.detoks[i].output_text)
        lp = out.logprobs.get(req.request_id)
        if lp is not None and o.logprobs is not None:
            o.logprobs.append(self._logprob(tok, lp))
        if req.finished:
            group.detoks[i].finish()
            o.finish_reason, o.stop_reason = req.finish_reason, req.stop_reason

    def _fail_group(self, group: _Group, error: Exception) -> RequestOutput:
        """End a request the engine could not carry on (all its choices), freeing its KV blocks and
        adapter; the output carries `error` for the caller. Touches no detokenizer: it may be what broke."""
        self.abort_request(group.request_id)
        outs = []
        for o in group.outputs:
            snap = copy.copy(o)
            snap.token_ids, snap.delta_token_ids, snap.delta_text = list(o.token_ids), [], ""
            snap.logprobs = None if o.logprobs is None else list(o.logprobs)
            if snap.finish_reason is None:
                snap.finish_reason = "abort"
            outs.append(snap)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, True,
                             group.children[0].num_cached_tokens, error=error)

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """End every request (after a failure outside any one request); returns their outputs."""
        return [self._fail_group(g, error) for g in list(self.groups.values())]

    def _check_trigger(self, req: Request, text: str) -> None:
        """Start the request's grammar once its output contains params.grammar_trigger."""
        trigger = req.params.grammar_trigger
        at = text.find(trigger, max(0, req.trigger_scan - len(trigger) + 1))
        if at < 0:
            req.trigger_scan = len(text)
            return
        req.trigger_scan = -1
        req.guide = self.structured.guide_after(req.params, text[at + len(trigger):])
        if req.guide is None:  # the token that completed the trigger already left the grammar
            log.warning("request %s: output after %r breaks its grammar; left unconstrained", req.request_id, trigger)
        elif req.guide.done:
            self.scheduler.finish_request(req.request_id, "stop")

    def _advance_guide(self, req: Request, tok: int) -> None:
        """Move the request's grammar past `tok`; end the request once the grammar is complete, so a
        structured output never waits one more step for an end-of-sequence token."""
        if not req.guide.accept(tok):  # the mask allowed it, so this is a library or engine bug
            log.error("request %s: grammar rejected token %d: %s", req.request_id, tok, req.guide.error)
            self.scheduler.finish_request(req.request_id, "abort")
        elif req.guide.done:
            self.scheduler.finish_request(req.request_id, "stop")

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
            if group.adapter_id is not None:
                self.lora.release(group.adapter_id)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, finished,
                             group.children[0].num_cached_tokens)

    # -- LoRA adapters (thread-safe: the server may call these while the engine loop runs) -------
    def _resolve_adapter(self, name: str | None, adapter_id: int | None) -> int | None:
        if name is None and adapter_id is None:
            return None
        if self.lora is None:
            raise LoRAError("this engine serves no LoRA adapters: start it with LoRA enabled (enable_lora, --lora)")
        if name is not None:
            aid = self.lora.resolve(name)
            if adapter_id is not None and adapter_id != aid:
                raise LoRAError(f"adapter {name!r} has id {aid}, not {adapter_id}")
            return aid
        return self.lora.check_id(adapter_id)

    def _need_lora(self):
        if self.lora is None:
            raise LoRAError("this engine serves no LoRA adapters: start it with LoRA enabled (enable_lora, --lora)")
        return self.lora

    def add_lora(self, name: str, path: str) -> int:
        """Register an adapter folder and validate it now (LoRAError with the reason when it cannot be
        served); its weights load in the background. Returns its adapter id. Adding the same name and
        path again is a no-op; the same name with another path is an error."""
        return self._need_lora().add(name, path)

    def register_lora(self, name: str, path: str) -> int:
        """Register without reading the folder (for thousands of adapters); validated at first use."""
        return self._need_lora().register(name, path)

    def register_lora_dir(self, folder: str) -> list[str]:
        """Register every subfolder of `folder` that holds an adapter, named after the subfolder."""
        return self._need_lora().register_dir(folder)

    def remove_lora(self, name: str) -> None:
        """Unregister (LoRANotFoundError if unknown); requests already using it finish with it."""
        self._need_lora().remove(name)

    def list_loras(self) -> list:
        """keel.lora.manager.LoRAInfo for every registered adapter ([] when LoRA is off)."""
        return [] if self.lora is None else self.lora.list()

    def validate_lora(self, name: str) -> int:
        """Validate a registered adapter (reads its config and safetensors header, not its weights) and
        return its id; call it off the engine thread before add_request so the check never stalls a step."""
        return self._need_lora().resolve(name)

    def _fail_adapter_requests(self) -> list[RequestOutput]:
        """Requests whose adapter's weights failed to load in the background end with "abort"."""
        failures = self.lora.pop_load_failures()
        results = []
        for group in list(self.groups.values()):
            if group.adapter_id not in failures:
                continue
            log.error("request %s cannot run: %s", group.request_id, failures[group.adapter_id])
            for i, child in enumerate(group.children):
                self.scheduler.finish_request(child.request_id, "abort")
                if group.outputs[i].finish_reason is None:
                    group.outputs[i].finish_reason = "abort"
                    group.detoks[i].finish()
            out = self._emit(group)
            out.error = failures[group.adapter_id]
            results.append(out)
        return results
