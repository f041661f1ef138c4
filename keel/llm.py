"""The offline Python API, in the shape vLLM users know:

    from keel import LLM, SamplingParams
    llm = LLM()                       # the built-in model
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

from keel.config import CacheConfig, SchedulerConfig
from keel.engine.llm_engine import LLMEngine
from keel.errors import InvalidRequestError
from keel.outputs import RequestOutput
from keel.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, dtype=None, *, device: str | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 block_size: int = 16, num_blocks: int | None = None, kv_cache_memory_gb: float = 1.0,
                 enable_prefix_caching: bool = True) -> None:
        self.engine = LLMEngine(
            model, dtype=dtype, device=device, max_model_len=max_model_len,
            cache=CacheConfig(block_size, num_blocks, kv_cache_memory_gb, enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token ids, or a list of token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidRequestError("prompts must be a non-empty list of strings or of token-id lists")
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = self.engine.new_request_id()
                self.engine.add_request(rid, prompt, p if p is not None else SamplingParams())
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def chat(self, messages, sampling_params=None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode(
            self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                               **(chat_template_kwargs or {})),
            add_special_tokens=False) for c in convs]
        return self.generate(prompts, sampling_params)

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
