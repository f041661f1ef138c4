"""The synchronous engine: requests in, one scheduler step and one model step at a time, outputs out."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch

from keel.config import EngineConfig, engine_config
from keel.engine.adapters import Adapters
from keel.engine.block_pool import BlockPool
from keel.engine.device import parse_dtype, pick_device
from keel.engine.guided import GrammarBackend, fill_bitmask
from keel.engine.input_processor import InputProcessor
from keel.engine.model_runner import ModelRunner
from keel.engine.output_processor import Group, OutputProcessor
from keel.engine.scheduler import Scheduler
from keel.errors import InvalidRequestError
from keel.models.loader import DEFAULT_MODEL_NAME, build_model, open_checkpoint, resolve_model
from keel.models.registry import model_class
from keel.outputs import RequestOutput
from keel.quant.config import parse_quantization
from keel.quant.config import resolve as resolve_quantization
from keel.quant.convert import weight_bytes
from keel.sampling_params import SamplingParams

log = logging.getLogger("keel")


class LLMEngine:
    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **options) -> None:
        """config: keel.config.EngineConfig; options change any of its fields by name (dtype="float32",
        max_num_seqs=8, enable_lora=True, ...) or a whole group (cache=CacheConfig(...)): see
        keel.config.engine_config. Resolved once here: the effective settings are `self.config`.

        quantization: "int8", "int4" or a keel.quant.QuantConfig (weight-only, at load; a checkpoint
        written by `keel quantize` is quantized already and needs none); "gguf" keeps a GGUF file's
        Q4_0/Q4_1/Q8_0 blocks as they are, "none" dequantizes them; None: "gguf" for a GGUF file with such
        blocks where keel's CPU kernels serve a float32 model (see default_gguf_quantization), else none.
        kernels, cpu_isa, batch_invariant: which code computes each layer, chosen once here
        (keel.kernels.backend)."""
        if model is not None:
            options["model"] = model
        cfg = engine_config(config, **options)
        load, compute, cache, sched_cfg = cfg.load, cfg.compute, cfg.cache, cfg.scheduler
        self.weight_dtype = load.weight_dtype
        self.device = pick_device(load.device)
        if self.device.type == "cpu":
            # Denormal floats (common in attention and small activations) take a slow microcode path on
            # x86; flushing them to zero changes results by less than float32 rounding does.
            torch.set_flush_denormal(True)
        self.dtype = parse_dtype(load.dtype, self.device)
        from keel.kernels.backend import choose
        self.backend = choose(self.device, self.dtype, compute.kernels, compute.cpu_isa, compute.batch_invariant)
        auto_quantization = load.quantization is None and load.quantize_group_size is None
        quantization = parse_quantization(load.quantization, load.quantize_group_size)
        self.model_path = resolve_model(load.model)
        ckpt = open_checkpoint(self.model_path)
        if auto_quantization:
            from keel.quant.gguf_blocks import default_gguf_quantization
            quantization = default_gguf_quantization(ckpt, self.device, self.dtype, self.backend)
        self.model_name = DEFAULT_MODEL_NAME if load.model is None else ckpt.name
        self.model_config = mcfg = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.checkpoint_files = ckpt.files
        self.cache_config = cache
        limit = mcfg.max_position_embeddings
        if mcfg.sliding_window and model_class(mcfg.architecture).window_caps_context:
            limit = min(limit, mcfg.sliding_window)  # within the window, full attention is exact
        if sched_cfg.max_model_len is not None:
            if sched_cfg.max_model_len > limit:
                raise InvalidRequestError(f"max_model_len={sched_cfg.max_model_len} is over this model's limit of {limit}")
            limit = sched_cfg.max_model_len
        self.model = build_model(ckpt, self.dtype, self.device, limit, quantization)
        self.quantization = resolve_quantization(ckpt.quantization, quantization, ckpt.name)
        self.model.prepare(self.backend, load.weight_dtype)

        from keel.engine.memory import kv_cache_blocks
        per_token = ModelRunner.kv_bytes_per_token(mcfg, self.dtype)
        num_blocks, sized = kv_cache_blocks(cache, sched_cfg.max_num_seqs, limit, per_token, self.device)
        # A single request must always fit in the cache, or preemption could never make room for it.
        self.max_model_len = min(limit, num_blocks * cache.block_size)
        self.scheduler_config = sched_cfg = dataclasses.replace(sched_cfg, max_model_len=self.max_model_len)
        self.config = dataclasses.replace(cfg, scheduler=sched_cfg)
        self.num_blocks = num_blocks
        self.kv_cache_sized = sized
        self.lora = None
        if cfg.lora.enable_lora:
            from keel.lora.manager import LoRAManager
            self.lora = LoRAManager(self.model, cfg.lora, self.dtype, self.device, served_model=self.model_name)
        self.pool = BlockPool(num_blocks, cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.pool, cache.block_size, adapters=self.lora)
        self.runner = ModelRunner(self.model, num_blocks, cache.block_size, self.dtype, self.device, lora=self.lora)
        self.adapters = Adapters(self.lora)
        self.structured = GrammarBackend(self.tokenizer, mcfg.vocab_size)
        eos = tuple(mcfg.eos_token_ids or self.tokenizer.eos_token_ids)
        self.inputs = InputProcessor(self.tokenizer, mcfg.vocab_size, eos, self.structured, self.max_model_len)
        self.outputs = OutputProcessor(self.tokenizer, self.structured, self.scheduler.finish_request)
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

    @property
    def groups(self) -> dict[str, Group]:
        """Requests in flight by id (each with its `n` sequences)."""
        return self.outputs.groups

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter_id: int | None = None, adapter: str | None = None) -> None:
        """adapter: a registered LoRA adapter's name (or adapter_id, its id); neither: the base model.
        An adapter that is not registered raises LoRANotFoundError, one that fails validation LoRAError."""
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        adapter_id = self.adapters.resolve(adapter, adapter_id)
        req = self.inputs.process(request_id, prompt, params, adapter_id)
        self.outputs.add(request_id, req.prompt, req.prompt_token_ids, req.children, adapter_id)
        if adapter_id is not None:
            self.lora.acquire(adapter_id)
        for child in req.children:
            self.scheduler.add_request(child)

    def abort_request(self, request_id: str) -> None:
        group = self.groups.get(request_id)
        if group is not None:
            self._drop(group)

    def _drop(self, group: Group) -> None:
        """Forget a request: its sequences leave the scheduler (freeing their KV blocks), its adapter is released."""
        self.outputs.drop(group)
        for child in group.children:
            self.scheduler.abort_request(child.request_id)
        if group.adapter_id is not None:
            self.lora.release(group.adapter_id)

    def expire_request(self, request_id: str) -> RequestOutput | None:
        """End a request now with finish_reason "length" and return its final output (None: unknown)."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        return self._end(group, "length")

    def _end(self, group: Group, reason: str) -> RequestOutput:
        for child in group.children:
            self.scheduler.finish_request(child.request_id, reason)
        self.outputs.end(group, reason)
        return self._emit(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.device.type == "cpu":
            # The flag lives in a per-thread register: set it on whichever thread steps (the server's
            # engine thread is not the one that built the engine), or that thread runs slower and its
            # tokens can differ from the offline API's.
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
            groups = {g.request_id: g for g in map(self.outputs.group_of, sched.num_scheduled_tokens) if g is not None}
            return failed + [self._fail_group(g, e) for g in groups.values()]
        results = failed
        for group, error in self.outputs.process(updated, out):
            if error is not None:
                results.append(self._fail_group(group, error))
                continue
            try:
                results.append(self._emit(group))
            except Exception as e:
                log.exception("request %s failed while its output was built", group.request_id)
                results.append(self._fail_group(group, e))
        return results

    def _fill_grammar_masks(self, sched) -> None:
        """The allowed-token bitmask of every request that samples this step under a grammar."""
        for rid in sched.sampling_ids:
            req = self.scheduler.requests.get(rid)
            if req is not None and req.guide is not None:
                sched.grammar_bitmask[rid] = fill_bitmask(req.guide, self.model_config.vocab_size)

    def _emit(self, group: Group) -> RequestOutput:
        out = self.outputs.emit(group)
        if out.finished and group.adapter_id is not None:
            self.lora.release(group.adapter_id)
        return out

    def _fail_group(self, group: Group, error: Exception) -> RequestOutput:
        """End a request the engine could not carry on (all its choices), freeing its KV blocks and
        adapter; the output carries `error` for the caller."""
        self._drop(group)
        return self.outputs.failed(group, error)

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """End every request (after a failure outside any one request); returns their outputs."""
        return [self._fail_group(g, error) for g in list(self.groups.values())]

    def _fail_adapter_requests(self) -> list[RequestOutput]:
        """Requests whose adapter's weights failed to load in the background end with "abort"."""
        failures = self.lora.pop_load_failures()
        results = []
        for group in list(self.groups.values()):
            if group.adapter_id not in failures:
                continue
            log.error("request %s cannot run: %s", group.request_id, failures[group.adapter_id])
            out = self._end(group, "abort")
            out.error = failures[group.adapter_id]
            results.append(out)
        return results
