"""Turns a scheduler step into tensors, runs the model and samples.

The runner reads nothing of the scheduler's: it keeps its own state per request, built from the
plain-data SchedulerOutput (keel.engine.outputs), and answers with a RunnerOutput.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel.engine.outputs import NewRequestData, RunnerOutput, SchedulerOutput
from keel.engine.sampler import Sampler
from keel.layers.attention import AttentionMetadata
from keel.lora.layers import LoRAMetadata


@dataclass
class RunnerRequest:
    """The runner's own copy of one request."""
    request_id: str
    token_ids: list[int]  # prompt, then every generated token
    num_prompt_tokens: int
    params: object  # keel.sampling_params.SamplingParams
    eos_token_ids: tuple[int, ...]
    adapter_id: int | None
    block_ids: list[int]
    num_computed_tokens: int

    @classmethod
    def from_new(cls, new: NewRequestData) -> RunnerRequest:
        return cls(new.request_id, list(new.token_ids), new.num_prompt_tokens, new.params, new.eos_token_ids,
                   new.adapter_id, list(new.block_ids), new.num_computed_tokens)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, lora=None) -> None:
        self.model, self.block_size, self.device = model, block_size, device
        self.lora = lora  # keel.lora.manager.LoRAManager, or None when adapters are off
        # One K and one V tensor per layer, [num_blocks * block_size, kv_heads, head_dim]. Zeroed, not
        # empty: padding positions gathered from the cache are masked, but 0 * NaN would still be NaN.
        self.kv_caches = []
        for attn in model.attention_layers():
            shape = (num_blocks * block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
            self.kv_caches += [attn.k_cache, attn.v_cache]
            attn.use_own_kernel()
        if hasattr(model, "build_decode_stack"):
            model.build_decode_stack()  # weights, adapters' stacks and caches are final from here on
        self.sampler = Sampler(device)
        self.requests: dict[str, RunnerRequest] = {}

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_ids:
            self.requests.pop(rid, None)
        self.sampler.drop(sched.finished_ids)  # a preempted request keeps its generator: its draws go on
        for rid in sched.preempted_ids:
            self.requests.pop(rid, None)
        for new in sched.new_requests:
            self.requests[new.request_id] = RunnerRequest.from_new(new)
        for c in sched.cached_requests:
            st = self.requests[c.request_id]
            st.block_ids.extend(c.new_block_ids)
            st.num_computed_tokens = c.num_computed_tokens

    def _lora_order(self, batch: list[tuple[RunnerRequest, int]], sched: SchedulerOutput):
        """The batch in adapter-slot order (base-model requests last) and the step's LoRA metadata.
        Tokens of one slot then sit together, which the batched LoRA layout needs; attention and
        sampling do not care about the order of requests in a step."""
        if self.lora is None:
            return batch, None
        active = list(dict.fromkeys(r.adapter_id for r, _ in batch if r.adapter_id is not None))
        if not active:
            return batch, None
        plan = self.lora.prepare_step(active, sched.adapter_ids_in_use)
        S = len(active)
        order = sorted(batch, key=lambda item: plan.positions.get(item[0].adapter_id, S))
        counts = [0] * S
        for r, n in order:
            if r.adapter_id is not None:
                counts[plan.positions[r.adapter_id]] += n
        return order, LoRAMetadata.build(counts, plan.groups, self.device, self.lora.costs, self.lora.kernel_max_rows)

    @staticmethod
    def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        if not sched.num_scheduled_tokens:
            return RunnerOutput({})
        batch = [(self.requests[rid], n) for rid, n in sched.num_scheduled_tokens.items()]
        order, lora = self._lora_order(batch, sched)
        input_ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        sample_rows, sample_reqs = [], []
        offset = 0
        for req, n in order:
            start = req.num_computed_tokens
            input_ids += req.token_ids[start:start + n]
            positions += range(start, start + n)
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(req.block_ids)
            offset += n
            if req.request_id in sched.sampling_ids:
                sample_rows.append(offset - 1)
                sample_reqs.append(req)
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, meta, lora)
        if not sample_reqs:
            return RunnerOutput({})
        # Only the rows that sample go through the output head: it is the largest matmul of a step.
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        tokens, lps, errors = self.sampler(logits, sample_reqs, sched.grammar_bitmask)
        for r, t in zip(sample_reqs, tokens):
            r.token_ids.append(t)
        return RunnerOutput(
            {r.request_id: t for r, t in zip(sample_reqs, tokens)},
            {r.request_id: lp for r, lp in zip(sample_reqs, lps) if lp is not None},
            errors,
        )
