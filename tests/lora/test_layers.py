"""The batched LoRA op against a plain per-token loop, over every layout the runner can produce."""

from __future__ import annotations

import pytest
import torch

from keel.lora.layers import LinearLoRA, LoRACosts, LoRAMetadata, rank_groups

IN, SHARDS, MAX_LORAS, MAX_RANK = 24, [16, 8, 8], 6, 8


def make_layer(ranks_per_slot: list[list[int]], seed: int = 0):
    """ranks_per_slot[slot][shard]; returns the layer and the reference weights per slot and shard."""
    g = torch.Generator().manual_seed(seed)
    layer = LinearLoRA(IN, SHARDS, MAX_LORAS, MAX_RANK, torch.float64, torch.device("cpu"))
    ref = {}
    for slot, ranks in enumerate(ranks_per_slot):
        for k, (r, out) in enumerate(zip(ranks, SHARDS)):
            if r:
                a, bt = torch.randn(r, IN, generator=g, dtype=torch.float64), torch.randn(r, out, generator=g, dtype=torch.float64)
                ref[slot, k] = (a, bt)
                layer.set_slot(slot, k, a, bt)
            else:
                layer.set_slot(slot, k, None, None)
    return layer, ref


def reference(x, slots_of_tokens, ref):
    y = torch.zeros(x.shape[0], sum(SHARDS), dtype=x.dtype)
    starts = [0, SHARDS[0], SHARDS[0] + SHARDS[1]]
    for t, slot in enumerate(slots_of_tokens):
        for k, out in enumerate(SHARDS):
            if slot is not None and (slot, k) in ref:
                a, bt = ref[slot, k]
                y[t, starts[k]:starts[k] + out] = (x[t] @ a.t()) @ bt
    return y


@pytest.mark.parametrize("counts,num_base", [
    ([3, 3, 3], 0),  # every slot the same: the layout is a view of x
    ([1, 1, 1, 1], 2),  # decode, with base-model tokens after
    ([9, 1, 2, 1], 1),  # one long prefill among decodes: overflow rows
    ([5, 5, 1, 1], 0),  # two long ones
    ([1], 0), ([12], 3),
])
@pytest.mark.parametrize("ranks", [
    [[8, 8, 8], [8, 0, 8], [4, 4, 4], [2, 2, 2]],  # mixed ranks, a slot not adapting shard 1
    [[8, 8, 8], [8, 8, 8], [8, 8, 8], [8, 8, 8]],
])
def test_batched_update_matches_per_token_loop(counts, num_base, ranks):
    S = len(counts)
    layer, ref = make_layer(ranks[:S])
    slots = [s for s, c in enumerate(counts) for _ in range(c)] + [None] * num_base
    x = torch.randn(len(slots), IN, dtype=torch.float64)
    base = torch.randn(len(slots), sum(SHARDS), dtype=torch.float64)
    want = base + reference(x, slots, ref)
    order_ranks = [max(r) for r in ranks[:S]]
    for groups in ([(0, S)], [(s, s + 1) for s in range(S)], rank_groups(order_ranks)):
        meta = LoRAMetadata.build(counts, groups, torch.device("cpu"))
        y = base.clone()
        layer.apply(x, y, meta)
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def shard_a(layer, slot, k):
    return layer.a[slot, k::layer.n]


def test_stale_rows_of_a_reused_slot_are_cleared():
    layer, _ = make_layer([[8, 8, 8]])
    a, bt = torch.randn(2, IN, dtype=torch.float64), torch.randn(2, SHARDS[0], dtype=torch.float64)
    layer.set_slot(0, 0, a, bt)  # rank 8 -> 2
    torch.testing.assert_close(shard_a(layer, 0, 0)[:2], a)
    assert shard_a(layer, 0, 0)[2:].abs().sum() == 0 and layer.b[0][0, 2:].abs().sum() == 0
    layer.set_slot(0, 1, None, None)
    assert shard_a(layer, 0, 1).abs().sum() == 0 and layer.ranks[1][0] == 0
    assert shard_a(layer, 0, 2).abs().sum() > 0 and layer.slot_rank[0] == 8


def test_moving_and_swapping_slots_keeps_each_adapter_whole():
    layer, ref = make_layer([[8, 8, 8], [2, 0, 4]])
    layer.move_slot(0, 1, swap=True)
    assert [r[:2] for r in layer.ranks] == [[2, 8], [0, 8], [4, 8]] and layer.slot_rank[:2] == [4, 8]
    torch.testing.assert_close(shard_a(layer, 1, 0), ref[0, 0][0])
    torch.testing.assert_close(shard_a(layer, 0, 0)[:2], ref[1, 0][0])
    assert shard_a(layer, 0, 0)[2:].abs().sum() == 0 and shard_a(layer, 0, 1).abs().sum() == 0
    layer.move_slot(1, 4, swap=False)
    torch.testing.assert_close(layer.b[2][4], ref[0, 2][1])
    assert layer.slot_rank[4] == 8


def test_rows_per_slot_and_rank_groups():
    assert LoRAMetadata.build([1, 1, 1], [(0, 3)], torch.device("cpu")).gather_index is None
    meta = LoRAMetadata.build([40, 1, 1, 1], [(0, 4)], torch.device("cpu"))
    assert meta.rows_per_slot == 1 and meta.overflow == [(0, 1, 40)]  # long prompt overflows, no padding
    meta = LoRAMetadata.build([3, 2, 2, 2], [(0, 4)], torch.device("cpu"))
    assert meta.rows_per_slot == 3 and not meta.overflow  # padding 3 rows is cheaper than an extra matmul
    assert rank_groups([16, 16, 8]) == [(0, 3)]  # one rank-8 slot: padding it is cheaper
    assert rank_groups([16] * 4 + [8] * 4 + [4], LoRACosts(16, 32)) == [(0, 4), (4, 9)]
    assert rank_groups([16] * 4 + [8] * 4 + [4], LoRACosts(16, 540)) == [(0, 9)]  # tiny model: never split
    assert rank_groups([64, 8, 8, 8, 8]) == [(0, 1), (1, 5)]


@pytest.mark.parametrize("counts,num_base", [
    ([1, 1, 1, 1, 1], 0),  # decode: matrix-vector products
    ([9, 1, 2, 1, 3], 2),  # token blocks of 4 with remainders, base-model rows after
    ([70, 1, 5, 1, 2], 1),  # a slot past KERNEL_MAX_ROWS goes through the matmul path
    ([6], 0),
])
def test_cpu_kernel_matches_the_torch_path(counts, num_base):
    """keel's float32 CPU kernel against the op's torch path, on widths that are not multiples of its
    vectors (in 37, shards 40/8/23), mixed ranks, shards a slot leaves alone, and a whole slot at rank 0."""
    from keel.kernels.cpu import kernels
    if kernels() is None:
        pytest.skip("keel's CPU kernels need Linux, AVX2, FMA and a C compiler")
    in_f, shards = 37, [40, 8, 23]
    layer = LinearLoRA(in_f, shards, MAX_LORAS, MAX_RANK, torch.float32, torch.device("cpu"))
    assert layer.kernel is not None
    g = torch.Generator().manual_seed(3)
    for slot, ranks in enumerate([[8, 8, 8], [8, 0, 8], [4, 4, 4], [2, 3, 1], [0, 0, 0]]):
        for k, (r, out) in enumerate(zip(ranks, shards)):
            layer.set_slot(slot, k, *((torch.randn(r, in_f, generator=g), torch.randn(r, out, generator=g))
                                      if r else (None, None)))
    layer.move_slot(1, 5, swap=True)  # the kernel's rank table follows moves
    layer.move_slot(1, 5, swap=True)
    x = torch.randn(sum(counts) + num_base, in_f, generator=g)
    base = torch.randn(x.shape[0], sum(shards), generator=g)
    meta = LoRAMetadata.build(counts, [(0, len(counts))], torch.device("cpu"))
    got = base.clone()
    layer.apply(x, got, meta)
    kernel, layer.kernel = layer.kernel, None
    want = base.clone()
    layer.apply(x, want, meta)
    layer.kernel = kernel
    assert (want - base).abs().max() > 1  # the update is not nothing
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_bfloat16_stacks_hold_bfloat16_adapters_exactly():
    """lora_dtype="bfloat16" under a float32 model with keel's kernel (opt-in; the default keeps the
    model's float32): the scale kept apart from B. For weights a bfloat16 holds (an adapter saved in
    bfloat16) the update equals float32 stacks with the scale folded in, through slot moves."""
    from keel.kernels.cpu import kernels
    from keel.lora.layers import lora_store_dtype
    cpu = torch.device("cpu")
    assert lora_store_dtype("auto", torch.float32, cpu) == torch.float32  # exact by default, everywhere
    if kernels() is None:
        pytest.skip("keel's CPU kernels need Linux, AVX2, FMA and a C compiler")
    assert lora_store_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16
    assert lora_store_dtype("float32", torch.float32, cpu) == torch.float32
    assert lora_store_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        lora_store_dtype("float16", torch.float32, cpu)
    in_f, shards = 40, [48, 16]
    half = LinearLoRA(in_f, shards, MAX_LORAS, MAX_RANK, torch.float32, cpu, torch.bfloat16)
    full = LinearLoRA(in_f, shards, MAX_LORAS, MAX_RANK, torch.float32, cpu)
    assert not half.folded and half.a.dtype == torch.bfloat16 and half.nbytes() * 2 == full.nbytes()
    g = torch.Generator().manual_seed(5)
    for slot, (ranks, scale) in enumerate([([8, 4], 0.37), ([3, 0], 2.5), ([6, 6], 1 / 3)]):
        for k, (r, out) in enumerate(zip(ranks, shards)):
            if not r:
                half.set_slot(slot, k, None, None)
                full.set_slot(slot, k, None, None)
                continue
            a, bt = (torch.randn(n, generator=g).bfloat16() for n in [(r, in_f), (r, out)])
            half.set_slot(slot, k, a, bt, scale)
            full.set_slot(slot, k, a.float(), bt.float() * scale)
    half.move_slot(0, 2, swap=True)
    full.move_slot(0, 2, swap=True)
    counts = [3, 1, 70]  # the last slot runs the matmul path, which widens the bfloat16 stacks
    x = torch.randn(sum(counts), in_f, generator=g)
    base = torch.randn(x.shape[0], sum(shards), generator=g)
    meta = LoRAMetadata.build(counts, [(0, 3)], cpu)
    got, want = base.clone(), base.clone()
    half.apply(x, got, meta)
    full.apply(x, want, meta)
    assert (want - base).abs().max() > 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_kernel_rank_padding_ablation_changes_nothing_but_cost():
    """bench/lora.py's ablation runs every slot at the stacks' full rank: rows past an adapter's rank are
    zero, so the update is the same."""
    from keel.kernels.cpu import kernels
    if kernels() is None:
        pytest.skip("keel's CPU kernels need Linux, AVX2, FMA and a C compiler")
    layer = LinearLoRA(IN, SHARDS, MAX_LORAS, MAX_RANK, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(9)
    for slot, ranks in enumerate([[2, 2, 2], [8, 0, 4]]):
        for k, (r, out) in enumerate(zip(ranks, SHARDS)):
            layer.set_slot(slot, k, *((torch.randn(r, IN, generator=g), torch.randn(r, out, generator=g))
                                      if r else (None, None)))
    x, base = torch.randn(5, IN, generator=g), torch.randn(5, sum(SHARDS), generator=g)
    meta = LoRAMetadata.build([3, 2], [(0, 2)], torch.device("cpu"))
    own, padded = base.clone(), base.clone()
    layer.apply(x, own, meta)
    layer.pad_ranks = True
    layer.apply(x, padded, meta)
    assert (own - base).abs().max() > 1
    torch.testing.assert_close(padded, own, rtol=1e-5, atol=1e-4)
