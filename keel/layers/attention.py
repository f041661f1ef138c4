"""Attention over the paged KV cache.

The runner builds one AttentionMetadata per step and passes it down explicitly. Every layer writes
the step's new keys and values into its cache slots, then gathers each request's whole context
from its block table and runs scaled-dot-product attention over a [batch, query, context] layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    gather_blocks: torch.Tensor  # [B, NB] int64: each request's block table, padded with block 0
    attn_mask: torch.Tensor | None  # [B, 1, Q, NB * block_size] bool, True where attention is allowed
    query_index: torch.Tensor | None  # [T] int64 into a flattened [B * Q] layout; None when every request has Q tokens
    batch_size: int
    max_query_len: int
    block_size: int
    context_lens: torch.Tensor | None = None  # [B] int32 on the CPU: tokens in the cache per request
    query_lens: list[int] | None = None
    _items: tuple | None = None

    def prefill_items(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For keel's prefill attention kernel: (query lens int32 [B], each request's first row int64 [B],
        work items int64 [n, 2]: (request, first token) per 16 tokens), built once per step."""
        if self._items is None:
            first, items, row = [], [], 0
            for b, q in enumerate(self.query_lens):
                first.append(row)
                items += [(b, t) for t in range(0, q, 16)]
                row += q
            self._items = (torch.tensor(self.query_lens, dtype=torch.int32), torch.tensor(first, dtype=torch.int64),
                           torch.tensor(items, dtype=torch.int64))
        return self._items

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device) -> "AttentionMetadata":
        """query_lens: tokens computed this step per request; context_lens: tokens in the cache after it."""
        B, Q = len(query_lens), max(query_lens)
        NB = max(-(-c // block_size) for c in context_lens)
        L = NB * block_size
        gather = torch.zeros(B, NB, dtype=torch.int64)
        slots = []
        for b, (q, c, table) in enumerate(zip(query_lens, context_lens, block_tables)):
            t = torch.tensor(table[:-(-c // block_size)], dtype=torch.int64)
            gather[b, :len(t)] = t
            pos = torch.arange(c - q, c, dtype=torch.int64)
            slots.append(t[pos // block_size] * block_size + pos % block_size)
        slot_mapping = torch.cat(slots)

        mask = None
        if Q > 1 or any(c != L for c in context_lens):
            q_lens = torch.tensor(query_lens)
            c_lens = torch.tensor(context_lens)
            i = torch.arange(Q).view(1, Q, 1)
            j = torch.arange(L).view(1, 1, L)
            # query i of request b sits at absolute position c_b - q_b + i and sees keys up to it
            last = (c_lens - q_lens).view(B, 1, 1) + i
            mask = (j <= last) & (j < c_lens.view(B, 1, 1))
            mask[:, :, 0] = True  # padding queries would see nothing and give NaN rows
            mask = mask.unsqueeze(1).to(device)
        query_index = None
        if len(set(query_lens)) > 1:
            query_index = torch.cat([b * Q + torch.arange(q) for b, q in enumerate(query_lens)]).to(device)
        ctx = torch.tensor(context_lens, dtype=torch.int32) if device.type == "cpu" else None
        return cls(slot_mapping.to(device), gather.to(device), mask, query_index, B, Q, block_size, ctx,
                   list(query_lens))


@dataclass
class CausalBatch:
    """The attention metadata of a training forward (keel.finetune): sequences of these lengths packed
    one after another, no padding and no KV cache. Every projection runs once over all the rows; each
    sequence attends causally within itself."""
    lengths: list[int]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache: torch.Tensor | None = None  # [num_blocks * block_size, KVH, D], set by the runner
        self.v_cache: torch.Tensor | None = None
        # keel's CPU decode kernel (keel.kernels.cpu), set by the runner for a float32 cache on the CPU
        self.own = None

    def use_own_kernel(self) -> None:
        """Decode steps through keel's CPU kernel, where it runs: a float32 cache on an x86 CPU with
        AVX2 and FMA. It reads each request's keys and values in place in the cache blocks; the general
        path below gathers every request's context into a padded copy first and hands it to SDPA, a copy
        that costs more than the attention itself at decode (bench/profile_decode.py)."""
        from keel.kernels.backend import of
        backend = of(self)
        ok = (self.k_cache is not None and self.k_cache.device.type == "cpu" and self.k_cache.dtype == torch.float32
              and self.head_dim % 8 == 0 and self.head_dim <= 256 and self.num_heads // self.num_kv_heads <= 16)
        self.own = backend.cpu_kernels() if ok else None
        on_cpu = self.k_cache is not None and self.k_cache.device.type == "cpu"
        self.every_token = on_cpu and backend.batch_invariant
        if self.own is not None:
            impl = f"keel {self.own.isa}" + (" (every token)" if self.every_token else " (decode), torch sdpa (prefill)")
        else:
            impl = "torch sdpa" + (" (one query token at a time)" if self.every_token else "")
        backend.record("attention", impl)
        backend.record("rotary+cache", f"keel {self.own.isa}" if self.own is not None else "torch")

    backend = None  # keel.kernels.backend.Backend, set by the model's prepare()
    every_token = False  # prefill tokens too go through keel's kernel, one query row at a time

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                cached: bool = False) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] -> [T, H * D]; cached: k and v are already in their cache slots
        if isinstance(meta, CausalBatch):
            return self._causal(q, k, v, meta)
        if not cached:
            self.k_cache.index_copy_(0, meta.slot_mapping, k)
            self.v_cache.index_copy_(0, meta.slot_mapping, v)
        Q, D = meta.max_query_len, self.head_dim
        if (self.own is not None and meta.context_lens is not None and q.dtype == torch.float32
                and q.stride(2) == 1 and q.stride(1) == D):
            if Q == 1:
                return self.own.decode_attention(q, self.k_cache, self.v_cache, meta.gather_blocks,
                                                 meta.context_lens, meta.block_size, self.scale)
            if self.every_token:
                # Each token is a query over its own causal context, computed as a decode step computes
                # it: its result cannot depend on how the prompt was chunked or what else the step holds.
                return self.own.prefill_attention(q, self.k_cache, self.v_cache, meta.gather_blocks,
                                                  meta.context_lens, meta.prefill_items(), meta.block_size,
                                                  self.scale)
        if self.every_token and self.own is None and meta.context_lens is not None:
            return self._one_query_at_a_time(q, meta)
        return self._batched(q, meta)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: CausalBatch) -> torch.Tensor:
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        outs, start = [], 0
        for n in meta.lengths:  # one SDPA call per sequence: no padding, no mask
            sl = slice(start, start + n)
            o = F.scaled_dot_product_attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                               v[sl].transpose(0, 1)[None], is_causal=True, scale=self.scale,
                                               enable_gqa=H != KVH)
            outs.append(o[0].transpose(0, 1).reshape(n, H * D))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _one_query_at_a_time(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Batch-invariant attention without keel's kernel (PyTorch's operators, or a bfloat16 cache): each
        token's SDPA call has one query over exactly its causal context, the same shapes and strides
        whether it comes in a decode step, a prefill chunk of any size or a batch of any composition. One
        call per token: slower than the batched path, which pads every request to the longest context
        (and so sums differently with the batch)."""
        H, KVH, D, bs = self.num_heads, self.num_kv_heads, self.head_dim, meta.block_size
        out = q.new_empty(q.shape[0], H * D)
        t = 0
        for b, (qn, c) in enumerate(zip(meta.query_lens, meta.context_lens.tolist())):
            blocks = meta.gather_blocks[b, :-(-c // bs)]
            keys = self.k_cache.view(-1, bs, KVH, D).index_select(0, blocks).view(-1, KVH, D).transpose(0, 1)
            values = self.v_cache.view(-1, bs, KVH, D).index_select(0, blocks).view(-1, KVH, D).transpose(0, 1)
            for i in range(qn):
                n = c - qn + i + 1
                o = F.scaled_dot_product_attention(q[t + i].view(1, H, 1, D), keys[None, :, :n], values[None, :, :n],
                                                   scale=self.scale, enable_gqa=H != KVH)
                out[t + i] = o.view(H * D)
            t += qn
        return out

    def _batched(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        B, Q, H, D = meta.batch_size, meta.max_query_len, self.num_heads, self.head_dim
        # Whole blocks by index_select: one gather per block instead of one per slot (bench/kernels.py).
        blocks = meta.gather_blocks.view(-1)
        shape = (B, -1, self.num_kv_heads, D)
        keys = self.k_cache.view(-1, meta.block_size, self.num_kv_heads, D).index_select(0, blocks)
        values = self.v_cache.view(-1, meta.block_size, self.num_kv_heads, D).index_select(0, blocks)
        keys, values = keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)  # [B, KVH, L, D]
        if meta.query_index is None:
            qp = q.view(B, Q, H, D)
        else:
            qp = q.new_zeros(B * Q, H, D).index_copy_(0, meta.query_index, q).view(B, Q, H, D)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=meta.attn_mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        out = out.transpose(1, 2).reshape(B * Q, H * D)
        if meta.query_index is not None:
            out = out.index_select(0, meta.query_index)
        return out
