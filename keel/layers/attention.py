"""Attention over the paged KV cache.

The runner builds one AttentionMetadata per step and passes it down explicitly. Every layer writes
the step's new keys and values into its cache slots, then gathers each request's whole context
from its block table and runs scaled-dot-product attention over a [batch, query, context] layout.

A layer may also carry what some families add to the scores (`Scores`): soft-capping (Gemma 2), a
sliding window (Gemma's local layers, Phi-3), ALiBi position biases (MPT, Falcon-RW). Those run on the
eager path below (scores computed, changed and normalised in float32), the same arithmetic on the CPU and
on a GPU; keel's CPU attention kernels serve the plain layers only.
"""

from __future__ import annotations

import math
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
    contexts: list[int] | None = None  # tokens in the cache per request, on every device
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
                   list(query_lens), list(context_lens))


@dataclass
class CausalBatch:
    """The attention metadata of a training forward (keel.finetune): sequences of these lengths packed
    one after another, no padding and no KV cache. Every projection runs once over all the rows; each
    sequence attends causally within itself."""
    lengths: list[int]


@dataclass(frozen=True)
class Scores:
    """What a family does to the attention scores beyond scaling them. softcap: scores become
    softcap * tanh(scores / softcap) (Gemma 2); window: a query sees only the keys less than `window`
    positions behind it (itself included); alibi: one slope per head, each score gets slope * (key
    position - query position) added after scaling (see alibi_slopes)."""
    softcap: float | None = None
    window: int | None = None
    alibi: tuple[float, ...] | None = None

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.window is None and self.alibi is None


def alibi_slopes(num_heads: int, max_bias: float = 8.0, interleave_rest: bool = False) -> tuple[float, ...]:
    """ALiBi's per-head slopes: 2^(-max_bias * i / n) for i = 1..n over the power of two n at or above
    the head count, from the ALiBi paper (Press et al.). Head counts that are no power of two take
    the odd then the even slopes of the next power (MPT, interleave_rest=True), or the slopes of the power
    below followed by every other slope of the power above (BLOOM and Falcon)."""
    if interleave_rest:
        n = 2 ** math.ceil(math.log2(num_heads))
        slopes = [2.0 ** (-max_bias * i / n) for i in range(1, n + 1)]
        if n != num_heads:
            slopes = (slopes[1::2] + slopes[::2])[:num_heads]
        return tuple(slopes)
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-max_bias * i / n) for i in range(1, n + 1)]
    rest = [2.0 ** (-max_bias * i / (2 * n)) for i in range(1, 2 * (num_heads - n), 2)]
    return tuple(slopes + rest)


def eager_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
                    rel: torch.Tensor | None, scale: float, scores: Scores, slopes: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, Q, D], keys and values [B, KVH, L, D] (query head h reads key head h // (H / KVH)),
    allowed [B, 1, Q, L] bool or None (all), rel [B, 1, Q, L] key minus query position (for ALiBi)
    -> [B, H, Q, D]. Scores and their softmax in float32."""
    B, H, Q, D = q.shape
    KVH, L = keys.shape[1], keys.shape[2]
    G = H // KVH
    s = torch.matmul(q.reshape(B, KVH, G * Q, D), keys.transpose(-1, -2)).view(B, H, Q, L).float() * scale
    if slopes is not None:
        s = s + slopes.view(1, H, 1, 1) * rel
    if scores.softcap is not None:
        s = torch.tanh(s / scores.softcap) * scores.softcap
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).to(values.dtype)
    return torch.matmul(p.reshape(B, KVH, G * Q, L), values).view(B, H, Q, D)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 scores: Scores | None = None, device=None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.scores = scores or Scores()
        # ALiBi's slopes as a float32 tensor [H] (None without ALiBi)
        slopes = None if self.scores.alibi is None else torch.tensor(self.scores.alibi, dtype=torch.float32,
                                                                        device=device)
        self.register_buffer("slopes", slopes, persistent=False)
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
        ok = (self.scores.plain and self.k_cache is not None and self.k_cache.device.type == "cpu"
              and self.k_cache.dtype == torch.float32
              and self.head_dim % 8 == 0 and self.head_dim <= 256 and self.num_heads // self.num_kv_heads <= 16)
        self.own = backend.cpu_kernels() if ok else None
        on_cpu = self.k_cache is not None and self.k_cache.device.type == "cpu"
        self.every_token = on_cpu and backend.batch_invariant
        if self.own is not None:
            impl = f"keel {self.own.isa}" + (" (every token)" if self.every_token else " (decode), torch sdpa (prefill)")
        elif not self.scores.plain:
            impl = "torch eager" + (" (one query token at a time)" if self.every_token else "")
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
        if not self.scores.plain:
            if self.every_token and meta.contexts is not None:
                return self._eager_one_query_at_a_time(q, meta)
            return self._eager_batched(q, meta)
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

    def _allowed(self, qpos: torch.Tensor, kpos: torch.Tensor, valid: torch.Tensor | None = None):
        """qpos [B, Q, 1] and kpos [L] absolute positions -> (allowed [B, 1, Q, L], key minus query position)."""
        rel = kpos.view(1, 1, -1) - qpos
        allowed = rel <= 0
        if self.scores.window is not None:
            allowed &= rel > -self.scores.window
        if valid is not None:
            allowed &= valid
        return allowed.unsqueeze(1), rel.unsqueeze(1).float()

    def _eager_batched(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        B, Q, H, D, KVH, bs = meta.batch_size, meta.max_query_len, self.num_heads, self.head_dim, self.num_kv_heads, meta.block_size
        blocks = meta.gather_blocks.view(-1)
        keys = self.k_cache.view(-1, bs, KVH, D).index_select(0, blocks).view(B, -1, KVH, D).transpose(1, 2)
        values = self.v_cache.view(-1, bs, KVH, D).index_select(0, blocks).view(B, -1, KVH, D).transpose(1, 2)
        if meta.query_index is None:
            qp = q.view(B, Q, H, D)
        else:
            qp = q.new_zeros(B * Q, H, D).index_copy_(0, meta.query_index, q).view(B, Q, H, D)
        dev = q.device
        ctx = torch.tensor(meta.contexts, device=dev).view(B, 1, 1)
        qlen = torch.tensor(meta.query_lens, device=dev).view(B, 1, 1)
        i = torch.arange(Q, device=dev).view(1, Q, 1)
        kpos = torch.arange(keys.shape[2], device=dev)
        allowed, rel = self._allowed(ctx - qlen + i, kpos, kpos.view(1, 1, -1) < ctx)
        allowed[:, :, :, 0] |= (i >= qlen).view(B, 1, Q)  # padding queries would see nothing and give NaN rows
        out = eager_attention(qp.transpose(1, 2), keys, values, allowed, rel, self.scale, self.scores, self.slopes)
        out = out.transpose(1, 2).reshape(B * Q, H * D)
        if meta.query_index is not None:
            out = out.index_select(0, meta.query_index)
        return out

    def _eager_one_query_at_a_time(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """As _one_query_at_a_time, for layers with a Scores: each token over exactly the keys it sees."""
        H, KVH, D, bs = self.num_heads, self.num_kv_heads, self.head_dim, meta.block_size
        out = q.new_empty(q.shape[0], H * D)
        t, window = 0, self.scores.window
        for b, (qn, c) in enumerate(zip(meta.query_lens, meta.contexts)):
            blocks = meta.gather_blocks[b, :-(-c // bs)]
            keys = self.k_cache.view(-1, bs, KVH, D).index_select(0, blocks).view(-1, KVH, D).transpose(0, 1)
            values = self.v_cache.view(-1, bs, KVH, D).index_select(0, blocks).view(-1, KVH, D).transpose(0, 1)
            for i in range(qn):
                n = c - qn + i + 1
                first = max(0, n - window) if window is not None else 0
                kpos = torch.arange(first, n, device=q.device)
                _, rel = self._allowed(torch.full((1, 1, 1), n - 1, device=q.device), kpos)
                o = eager_attention(q[t + i].view(1, H, 1, D), keys[None, :, first:n], values[None, :, first:n],
                                    None, rel, self.scale, self.scores, self.slopes)
                out[t + i] = o.view(H * D)
            t += qn
        return out

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: CausalBatch) -> torch.Tensor:
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        outs, start = [], 0
        if not self.scores.plain:  # eager, one sequence at a time
            for n in meta.lengths:
                sl = slice(start, start + n)
                pos = torch.arange(n, device=q.device)
                allowed, rel = self._allowed(pos.view(1, n, 1), pos)
                o = eager_attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None],
                                    allowed, rel, self.scale, self.scores, self.slopes)
                outs.append(o[0].transpose(0, 1).reshape(n, H * D))
                start += n
            return outs[0] if len(outs) == 1 else torch.cat(outs)
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
