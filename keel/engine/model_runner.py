"""Turns a scheduler step into tensors, runs the model and samples."""

from __future__ import annotations

import torch

from keel.engine.outputs import RunnerOutput, SchedulerOutput
from keel.engine.sampler import Sampler
from keel.layers.attention import AttentionMetadata
from keel.lora.layers import LoRAMetadata


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, lora=None) -> None:
        self.model, self.block_size, self.device = model, block_size, device
        self.lora = lora  # keel.lora.manager.LoRAManager, or None when adapters are off
        cfg = model.config
        # One K and one V tensor per layer, [num_blocks * block_size, kv_heads, head_dim]. Zeroed, not
        # empty: padding positions gathered from the cache are masked, but 0 * NaN would still be NaN.
        self.kv_caches = []
        for attn in model.attention_layers():
            shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
            self.kv_caches += [attn.k_cache, attn.v_cache]
            attn.use_own_kernel()
        if hasattr(model, "build_decode_stack"):
            model.build_decode_stack()  # weights, adapters' stacks and caches are final from here on
        self.sampler = Sampler(device)

    def _lora_order(self, sched: SchedulerOutput):
        """The batch in adapter-slot order (base-model requests last) and the step's LoRA metadata.
        Tokens of one slot then sit together, which the batched LoRA layout needs; attention and
        sampling do not care about the order of requests in a step."""
        if self.lora is None:
            return sched.scheduled, None
        active = list(dict.fromkeys(s.request.adapter_id for s in sched.scheduled if s.request.adapter_id is not None))
        if not active:
            return sched.scheduled, None
        plan = self.lora.prepare_step(active, sched.adapter_ids_in_use)
        S = len(active)
        order = sorted(sched.scheduled, key=lambda s: plan.positions.get(s.request.adapter_id, S))
        counts = [0] * S
        for s in order:
            if s.request.adapter_id is not None:
                counts[plan.positions[s.request.adapter_id]] += s.num_tokens
        return order, LoRAMetadata.build(counts, plan.groups, self.device, self.lora.costs, self.lora.kernel_max_rows)

    @staticmethod
    def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.sampler.drop(sched.finished_ids)
        if not sched.scheduled:
            return RunnerOutput({})
        order, lora = self._lora_order(sched)
        input_ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        sample_rows, sample_reqs = [], []
        offset = 0
        for s in order:
            req, n = s.request, s.num_tokens
            start = req.num_computed_tokens
            input_ids += req.tokens(start, start + n)
            positions += range(start, start + n)
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(req.block_ids)
            offset += n
            if s.samples:
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
        tokens, lps, errors = self.sampler(logits, sample_reqs)
        return RunnerOutput(
            {r.request_id: t for r, t in zip(sample_reqs, tokens)},
            {r.request_id: lp for r, lp in zip(sample_reqs, lps) if lp is not None},
            errors,
        )
