"""The offline Python API, in the shape vLLM users know:

    from keel import LLM, SamplingParams
    llm = LLM()                       # the built-in model
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

from keel.config import EngineConfig
from keel.engine.llm_engine import LLMEngine
from keel.errors import InvalidRequestError
from keel.lora.request import LoRARequest
from keel.outputs import RequestOutput
from keel.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, dtype=None, *, config: EngineConfig | None = None,
                 **options) -> None:
        """model: a model folder, GGUF file or hub id (None: the built-in model). options: any field of
        keel.config's dataclasses by name (the same options as `keel serve`), for instance:

        quantization: "int8" or "int4" quantizes the weights as they load (or a keel.quant.QuantConfig
        for the int4 group size, or to quantize the embedding and output head too); "gguf" keeps a GGUF
        file's blocks (its default on CPU), "none" dequantizes them.
        weight_dtype: how a float32 model on CPU holds its dense weights: "auto" keeps those the
        checkpoint stores in bfloat16 in bfloat16 (exact, half the memory and bytes per token; keel's
        kernels compute in float32), "bfloat16" rounds every one to it, "model" keeps the model dtype.
        enable_lora: serve LoRA adapters (generate's lora_request), at most max_loras in one step, of rank
        up to max_lora_rank, max_cpu_loras of them kept loaded in memory, stored as lora_dtype.
        kv_cache_memory_gb, num_blocks, block_size, enable_prefix_caching: the KV cache.
        max_num_seqs, max_num_batched_tokens, max_model_len: the scheduler.
        kernels ("auto", "keel", "torch"), cpu_isa ("auto", "avx2", "avx512"): force which code computes
        the layers (keel.kernels.backend); batch_invariant=False trades a request's independence from its
        batch for faster long prefills.
        An unknown option is a TypeError naming it."""
        if dtype is not None:
            options["dtype"] = dtype
        self.engine = LLMEngine(model, config=config, **options)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token ids, or a list of token-id lists.
        lora_request: the adapter for every prompt, or one per prompt (None: the base model); an adapter
        with a path that is not registered yet is added (and validated) first."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidRequestError("prompts must be a non-empty list of strings or of token-id lists")
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
        loras = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise InvalidRequestError(f"{len(loras)} lora requests for {len(prompts)} prompts")
        names = [self._lora_name(r) for r in loras]
        ids = []
        try:
            for prompt, p, name in zip(prompts, params, names):
                rid = self.engine.new_request_id()
                self.engine.add_request(rid, prompt, p if p is not None else SamplingParams(), adapter=name)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def _lora_name(self, req: LoRARequest | None) -> str | None:
        if req is None:
            return None
        if not isinstance(req, LoRARequest):
            raise InvalidRequestError(f"lora_request must be a keel.lora.LoRARequest, not {type(req).__name__}")
        if req.path is not None:  # a no-op when already registered with this path
            self.engine.adapters.add(req.name, req.path)
        return req.name

    def add_lora(self, name: str, path: str) -> int:
        """Register and validate an adapter folder (keel.errors.LoRAError with the reason if it cannot be served)."""
        return self.engine.adapters.add(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.adapters.remove(name)

    def list_loras(self) -> list:
        return self.engine.adapters.list()

    def chat(self, messages, sampling_params=None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None, lora_request=None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode(
            self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                               **(chat_template_kwargs or {})),
            add_special_tokens=False) for c in convs]
        return self.generate(prompts, sampling_params, lora_request)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        try:
            while wanted - done.keys():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
        except BaseException:
            # Leave the engine clean (blocks freed, nothing queued) for the next call.
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [done[i] for i in ids]
