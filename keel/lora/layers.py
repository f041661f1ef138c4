"""Batched LoRA: many adapters' low-rank updates added to one batch's projections in one pass.

The runner orders a step's tokens by adapter slot (base-model tokens last), and the resident-adapter
manager keeps the step's S active adapters at stack positions 0..S-1. Every projection then adds, for
each output shard, `(x Aᵀ)(s Bᵀ)` to the tokens of each slot with two batched matmuls over a padded
[S, C, in] layout of the slots' tokens, whatever S is:

    h = bmm(x_layout [S, C, in], A[:S, :R]ᵀ)   # [S, C, R]
    y_layout = bmm(h, B[:S, :R])                 # [S, C, out], scale folded into B

No per-request weight merge, no forward pass per adapter. Why this layout (bench/results/lora.md):
- Slots at positions 0..S-1 make `A[:S, :R]` a view of the resident stack, so no step copies adapter
  weights. At decode each token of a distinct adapter is a matrix-vector product that reads that
  adapter once; bmm over a contiguous stack beat torch._grouped_mm, whose CPU fallback loops over
  groups, and gathering weights per token.
- R is the largest rank among the slots in a group, not the largest rank the server accepts; slots
  are ordered by rank and split into groups of equal rank when padding would cost more than the extra
  matmuls (see `rank_groups`), so an adapter's cost follows its own rank.
- C (rows per slot) is picked per step (`_pick_rows_per_slot`): a slot with more tokens than C (a
  prefill next to many decodes) runs its extra rows as separate matmuls, instead of padding every
  slot to the longest one.
Both trade-offs are priced per model by `LoRACosts`: on a small model an extra op costs more than
hundreds of padded rows, on a large one a few.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

# A slot with up to this many tokens in a step goes through keel's CPU kernel (one call for all such
# slots); one with more (a prefill chunk) through MKL's matmuls, which block for cache on many rows.
KERNEL_MAX_ROWS = 64


@dataclass
class LoRACosts:
    """The trade-offs of the layout, in one model's units; see `for_model`.

    overflow_cost_rows: what running a slot's rows past C as extra ops costs, in padded rows.
    split_min_rank_slots: computing a group of slots at its own rank instead of padding it to the
    previous group's pays off above this many (rank difference x slots in the group).
    """
    overflow_cost_rows: float
    split_min_rank_slots: float

    # The cost model's constants, fitted to bench/lora.py's measurements (bench/results/lora.md): the
    # cost of one small op, small-K matmul throughput, the rate adapter weights stream at, and how many
    # small ops an overflowing slot or an extra rank group adds per projection.
    OP_SECONDS, FLOPS, BYTES_PER_SECOND, OPS_PER_EXTRA = 10e-6, 20e9, 10e9, 5

    @classmethod
    def for_model(cls, elems_per_rank: int, num_projections: int, max_rank: int, elem_size: int) -> "LoRACosts":
        """elems_per_rank: weights one rank of one adapter adds over all projections (sum of in + out)."""
        extra = cls.OPS_PER_EXTRA * num_projections * cls.OP_SECONDS
        row = 2 * max_rank * elems_per_rank / cls.FLOPS
        rank = elems_per_rank * elem_size / cls.BYTES_PER_SECOND
        # e.g. SmolLM2-135M at rank 16, float32: 12 rows, 49 rank-slots; the tiny test models: 133, 540
        return cls(extra / row, extra / rank)


DEFAULT_COSTS = LoRACosts(overflow_cost_rows=16, split_min_rank_slots=48)


def rank_groups(ranks: list[int], costs: LoRACosts = DEFAULT_COSTS) -> list[tuple[int, int]]:
    """Split slots 0..S-1 (ordered by rank, largest first) into ranges computed at one rank each."""
    groups: list[list[int]] = []
    for i, r in enumerate(ranks):
        if groups and ranks[groups[-1][0]] == r:
            groups[-1][1] = i + 1
        else:
            groups.append([i, i + 1])
    merged: list[list[int]] = []
    for lo, hi in groups:
        if merged and (ranks[merged[-1][0]] - ranks[lo]) * (hi - lo) < costs.split_min_rank_slots:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def _pick_rows_per_slot(counts: list[int], costs: LoRACosts) -> int:
    best, best_cost = 1, None
    for c in sorted(set(counts)):
        cost = len(counts) * c + sum(costs.overflow_cost_rows + n - c for n in counts if n > c)
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
    return best


@dataclass
class LoRAMetadata:
    """How one step's tokens map onto the active adapter slots. Built once per step by the runner and
    passed down to every projection, like AttentionMetadata."""
    num_slots: int  # S: adapters active this step, at resident positions 0..S-1
    rows_per_slot: int  # C: rows per slot in the batched [S, C, in] layout
    num_lora_tokens: int  # tokens 0..N-1 belong to adapters, ordered by slot; the rest use the base model
    groups: list[tuple[int, int]]  # slot ranges computed with one bmm pair each (one rank per group)
    gather_index: torch.Tensor | None  # [S*C] int64 token row of each layout row (padding repeats a real
    # row, never scattered back); None when x[:S*C] already is the layout (every slot has C tokens)
    scatter_src: torch.Tensor | None  # [M] int64 layout rows that hold real tokens
    scatter_dst: torch.Tensor | None  # [M] int64 their token rows
    overflow: list[tuple[int, int, int]]  # (slot, first row, end row): a slot's tokens past the first C
    # For keel's CPU kernel (float32 on CPU): the slots of at most KERNEL_MAX_ROWS tokens, as int32
    # [slots, first rows, counts], and (slot, first row, end row) of the larger ones.
    kernel_slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    kernel_rest: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, counts: list[int], groups: list[tuple[int, int]], device: torch.device,
              costs: LoRACosts = DEFAULT_COSTS, kernel_max_rows: int = KERNEL_MAX_ROWS) -> "LoRAMetadata":
        """counts[s]: tokens of slot s this step (> 0), which sit contiguously in slot order."""
        S = len(counts)
        C = _pick_rows_per_slot(counts, costs)
        starts, n = [], 0
        for c in counts:
            starts.append(n)
            n += c
        overflow = [(s, starts[s] + C, starts[s] + c) for s, c in enumerate(counts) if c > C]
        meta = cls._build(S, C, n, counts, starts, groups, overflow, device)
        if device.type == "cpu":
            small = [s for s, c in enumerate(counts) if c <= kernel_max_rows]
            meta.kernel_slots = tuple(torch.tensor(v, dtype=torch.int32) for v in
                                      (small, [starts[s] for s in small], [counts[s] for s in small]))
            meta.kernel_rest = [(s, starts[s], starts[s] + c) for s, c in enumerate(counts) if c > kernel_max_rows]
        meta.counts = list(counts)
        return meta

    counts: list[int] | None = None

    def slot_rows(self) -> list[tuple[int, int, int]]:
        """(slot, first row, end row) of every slot's tokens."""
        out, start = [], 0
        for s, c in enumerate(self.counts):
            out.append((s, start, start + c))
            start += c
        return out

    @classmethod
    def _build(cls, S, C, n, counts, starts, groups, overflow, device) -> "LoRAMetadata":
        if all(c == C for c in counts):
            return cls(S, C, n, groups, None, None, None, [])
        gather, src, dst = [], [], []
        for s, (start, c) in enumerate(zip(starts, counts)):
            k = min(c, C)
            gather += list(range(start, start + k)) + [start] * (C - k)
            src += range(s * C, s * C + k)
            dst += range(start, start + k)
        def t(v):
            return torch.tensor(v, dtype=torch.int64).to(device)
        return cls(S, C, n, groups, t(gather), t(src), t(dst), overflow)


def _cpu_kernel(dtype: torch.dtype, device: torch.device, backend=None):
    """keel's CPU kernels where the batched update can use them (a float32 model on the CPU), else None."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    from keel.kernels.backend import default_backend
    return (backend or default_backend(device)).cpu_kernels()


def lora_store_dtype(lora_dtype: str, dtype: torch.dtype, device: torch.device, backend=None) -> torch.dtype:
    """The dtype resident adapter stacks hold (see LoRAConfig.lora_dtype).

    "auto" is the model's dtype: an adapter saved in float32 keeps every bit under a float32 model, and
    one saved in bfloat16 widens exactly. "bfloat16" under a float32 model on a CPU with keel's kernel
    is the opt-in lossy mode: the batched update streams every active adapter's weights each step,
    which at 64 requests over 27 adapters was ~400 MB a step in float32 (bench/results/lora.md);
    bfloat16 halves it, rounding float32-saved adapters (exact for bfloat16-saved ones)."""
    kernel = _cpu_kernel(dtype, device, backend) is not None
    if lora_dtype == "auto":
        return dtype
    want = getattr(torch, lora_dtype)
    if want != dtype and not (want == torch.bfloat16 and kernel):
        raise ValueError(f"lora_dtype {lora_dtype} under a {dtype} model is not supported here: adapters are "
                         "stored in the model's dtype, or in bfloat16 under a float32 model where keel's CPU "
                         "kernel runs (x86 with AVX2 and FMA, a C compiler)")
    return want


class LinearLoRA:
    """The resident adapters' weights for one Linear with n output shards (q/k/v or gate/up when fused).

    a: [max_loras, max_rank * n, in] lora_A rows of all shards, rank-major (row i*n + k is rank i of
       shard k), so one matmul shrinks x for every shard and slicing a step's rank R is the prefix
       [:R*n]; fused layers thus pay one shrink, not n.
    b[k]: [max_loras, max_rank, out_k] scale * lora_Bᵀ of shard k (lora_Bᵀ alone when not `folded`).
    A slot's rows past its rank are zero, so a group computed at a larger rank adds nothing extra.
    ranks[k][slot]: that slot's rank for shard k (0: the adapter does not adapt this projection).
    """

    def __init__(self, in_features: int, shard_sizes: list[int], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, store_dtype: torch.dtype | None = None,
                 backend=None) -> None:
        """dtype: the model's; store_dtype: the stacks' (default dtype). bfloat16 stacks under a float32
        model need keel's CPU kernel, which widens them in registers; they keep the scale apart from B
        (b[k] holds lora_Bᵀ as read, exact for bfloat16 adapter files) and halve the bytes a step reads."""
        self.slices, start = [], 0
        for size in shard_sizes:
            self.slices.append(slice(start, start + size))
            start += size
        self.n = len(shard_sizes)
        store_dtype = store_dtype or dtype
        self.a = torch.zeros(max_loras, max_rank * self.n, in_features, dtype=store_dtype, device=device)
        self.b = [torch.zeros(max_loras, max_rank, size, dtype=store_dtype, device=device) for size in shard_sizes]
        self.ranks = [[0] * max_loras for _ in shard_sizes]
        self.slot_rank = [0] * max_loras  # largest rank of the slot over its shards
        self.kernel = _cpu_kernel(dtype, device, backend)  # keel's CPU kernel (keel.kernels.cpu), or None
        # without it, a batch-invariant backend computes each slot's rows in fixed-size blocks
        self.fixed_rows = backend is not None and backend.batch_invariant and self.kernel is None
        self.folded = store_dtype == dtype  # the scale is folded into b; else it is in scales[k][slot]
        if not self.folded and (self.kernel is None or store_dtype != torch.bfloat16):
            raise ValueError(f"LoRA weights stored as {store_dtype} under a {dtype} model need keel's CPU "
                             "kernel (float32 model on an x86 CPU with AVX2, FMA and a C compiler) and bfloat16")
        self.scales = [[1.0] * max_loras for _ in shard_sizes]
        if self.kernel is not None:
            self._rank_table = torch.zeros(self.n, max_loras, dtype=torch.int32)  # ranks, for the kernel
            self._scale_table = torch.ones(self.n, max_loras, dtype=torch.float32)
            self._b_ptrs = (ctypes.c_void_p * self.n)(*[b.data_ptr() for b in self.b])
            self._out_sizes = (ctypes.c_int64 * self.n)(*shard_sizes)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.a] + self.b)

    def merges(self, linear) -> bool:
        """Never: one base pass serves the tokens of every adapter (keel.finetune.lora's training layer does)."""
        return False

    # -- slot management (the manager calls these between steps) ----------------------------
    def set_slot(self, slot: int, shard: int, a: torch.Tensor | None, bt: torch.Tensor | None,
                 scale: float = 1.0) -> None:
        """a: [r, in], bt: [r, out_k] (None: this adapter leaves the shard alone); with `folded` bt already
        carries the scale and `scale` is 1."""
        n, old = self.n, self.ranks[shard][slot]
        r = 0 if a is None else a.shape[0]
        if r:
            self.a[slot, shard:r * n:n].copy_(a, non_blocking=True)
            self.b[shard][slot, :r].copy_(bt, non_blocking=True)
        if old > r:
            self.a[slot, r * n + shard:old * n:n].zero_()
            self.b[shard][slot, r:old].zero_()
        self.ranks[shard][slot] = r
        self.scales[shard][slot] = scale
        self.slot_rank[slot] = max(ranks[slot] for ranks in self.ranks)
        if self.kernel is not None:
            self._rank_table[shard, slot] = r
            self._scale_table[shard, slot] = scale

    def move_slot(self, src: int, dst: int, swap: bool) -> None:
        """Copy slot src to dst; with swap, dst's adapter goes to src."""
        # Rows past a slot's rank are zero, so the first max(ranks) rows carry both adapters whole.
        r = max(self.slot_rank[src], self.slot_rank[dst])
        if r == 0:
            return
        for t, rows in [(self.a, r * self.n)] + [(b, r) for b in self.b]:
            if swap:
                t[[src, dst], :rows] = t[[dst, src], :rows]
            else:
                t[dst, :rows] = t[src, :rows]
        for ranks in self.ranks + self.scales + [self.slot_rank]:
            ranks[src], ranks[dst] = (ranks[dst] if swap else ranks[src]), ranks[src]
        if self.kernel is not None:
            self._rank_table[:, [src, dst]] = torch.tensor([[r[src], r[dst]] for r in self.ranks], dtype=torch.int32)
            self._scale_table[:, [src, dst]] = torch.tensor([[c[src], c[dst]] for c in self.scales])

    # -- the batched update ------------------------------------------------------------------
    def apply(self, x: torch.Tensor, y: torch.Tensor, meta: LoRAMetadata) -> None:
        """y += the LoRA update of every token of an active slot. x: [T, in]; y: [T, out], base output.

        A constant number of tensor ops whatever the number of adapters (about 2n + 4 for n shards),
        plus n + 2 per extra rank group or overflowing slot: on a CPU, small batches pay per op more
        than per flop. Every matmul operand keeps unit stride in its last dim: bmm on a strided slice,
        or baddbmm_ into a column slice of y, falls off MKL onto a much slower loop.
        """
        if self.kernel is not None and meta.kernel_slots is not None and x.dtype == torch.float32:
            self._apply_kernel(x, y, meta)
            return
        if self.fixed_rows:
            for s, r0, r1 in meta.slot_rows():
                self._rows_fixed(x, y, r0, r1, s)
            return
        S, C = meta.num_slots, meta.rows_per_slot
        view = meta.gather_index is None
        if view:
            xl = x[:S * C].view(S, C, x.shape[1])
        else:
            xl = x.index_select(0, meta.gather_index).view(S, C, x.shape[1])
        outs = []  # index layout: [G, C, out] per group, scattered once at the end
        for lo, hi in meta.groups:
            if view and hi - lo == 1:  # one slot: its rows are contiguous, plain 2-D matmuls
                self._rows(x, y, lo * C, hi * C, lo)
                continue
            parts = self._group(xl[lo:hi], lo, hi)
            if view:
                for part, sl in zip(parts, self.slices):
                    if part is not None:
                        y[lo * C:hi * C, sl].unflatten(0, (hi - lo, C)).add_(part)
            else:
                G = hi - lo
                parts = [p if p is not None else y.new_zeros(G, C, sl.stop - sl.start)
                         for p, sl in zip(parts, self.slices)]
                outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        if outs:
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            y.index_add_(0, meta.scatter_dst, out.view(S * C, -1).index_select(0, meta.scatter_src))
        for s, r0, r1 in meta.overflow:
            self._rows(x, y, r0, r1, s)

    pad_ranks = False  # for bench/lora.py's ablation only: the kernel computes every slot at max_rank

    def _apply_kernel(self, x: torch.Tensor, y: torch.Tensor, meta: LoRAMetadata) -> None:
        """keel's CPU kernel: one call for every slot with a few tokens, which reads each adapter's
        weights once and computes only real rows, with no layout gather, copy or scatter around the
        matmuls: the torch ops above, over a dozen per projection, cost more than the products themselves
        (bench/results/lora.md)."""
        slots, starts, counts = meta.kernel_slots
        ranks = self._rank_table
        if self.pad_ranks:  # ablation: every adapted shard at the stacks' full rank (rows past a rank are zero)
            ranks = torch.where(ranks > 0, self.b[0].shape[1], 0).to(torch.int32)
        if slots.numel():
            x, yk = x.contiguous(), y if y.is_contiguous() else y.contiguous()
            h = torch.empty(meta.num_lora_tokens, self.a.shape[1], dtype=torch.float32)
            self.kernel.lora(x, yk, h, self.a, self._b_ptrs, self._out_sizes, ranks, self._scale_table,
                             slots, starts, counts)
            if yk is not y:
                y.copy_(yk)
        for s, r0, r1 in meta.kernel_rest:
            self._rows(x, y, r0, r1, s)

    def _rows(self, x: torch.Tensor, y: torch.Tensor, r0: int, r1: int, slot: int) -> None:
        """y[r0:r1] += slot's update of x[r0:r1]: n + 2 ops, the update added by addmm_ in place."""
        n, r = self.n, self.slot_rank[slot]
        if r == 0:
            return
        h = x[r0:r1] @ self.a[slot, :r * n].to(x.dtype).t()  # [rows, r * n], rank-major
        if n > 1:
            h = h.view(r1 - r0, r, n).transpose(1, 2).contiguous()  # [rows, n, r]
        for k, sl in enumerate(self.slices):
            rk = self.ranks[k][slot]
            if rk:
                y[r0:r1, sl].addmm_(h[:, k, :rk] if n > 1 else h[:, :rk], self.b[k][slot, :rk].to(x.dtype),
                                    alpha=self.scales[k][slot])

    def _rows_fixed(self, x: torch.Tensor, y: torch.Tensor, r0: int, r1: int, slot: int) -> None:
        """_rows in fixed-size row blocks: each row's update computed the same way whatever the step."""
        from keel.layers.linear import fixed_rows_linear
        n, r = self.n, self.slot_rank[slot]
        if r == 0:
            return
        h = fixed_rows_linear(x[r0:r1], self.a[slot, :r * n].to(x.dtype), None)
        if n > 1:
            h = h.view(r1 - r0, r, n).transpose(1, 2)
        for k, sl in enumerate(self.slices):
            rk = self.ranks[k][slot]
            if rk:
                hk = (h[:, k, :rk] if n > 1 else h[:, :rk]).contiguous()
                upd = fixed_rows_linear(hk, self.b[k][slot, :rk].to(x.dtype).t(), None)
                y[r0:r1, sl].add_(upd, alpha=self.scales[k][slot])

    def _group(self, xg: torch.Tensor, lo: int, hi: int) -> list[torch.Tensor | None]:
        """Per shard the update of slots lo..hi-1 for xg: [G, C, in] (None where no slot adapts it)."""
        n = self.n
        r = max(self.slot_rank[lo:hi])
        if r == 0:
            return [None] * n
        h = torch.bmm(xg, self.a[lo:hi, :r * n].transpose(1, 2))  # [G, C, r * n], rank-major
        if n > 1:
            h = h.view(h.shape[0], h.shape[1], r, n).transpose(2, 3).contiguous()  # [G, C, n, r]
        parts = []
        for k in range(n):
            rk = max(self.ranks[k][lo:hi])
            hk = h[:, :, k, :rk] if n > 1 else h[:, :, :rk]
            parts.append(torch.bmm(hk, self.b[k][lo:hi, :rk]) if rk else None)
        return parts
