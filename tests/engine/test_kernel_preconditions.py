"""keel's C kernels check their own preconditions: a call against them is a KernelArgumentError, never
a read or write out of bounds; and their scratch memory is reused from step to step."""

from __future__ import annotations

import pytest
import torch

from keel.kernels.cpu import W_F32, W_INT4, W_INT8G, KernelArgumentError, kernels, runnable_isas

pytestmark = pytest.mark.skipif(kernels() is None, reason="keel's CPU kernels need Linux, AVX2, FMA and a C compiler")


@pytest.fixture(params=["avx2", "avx512"])
def own(request):
    if request.param not in runnable_isas():
        pytest.skip(f"this CPU does not run keel's {request.param} build")
    return kernels(request.param)


def test_gemm_refuses_shapes_its_loops_cannot_take(own):
    x = torch.randn(3, 12)
    with pytest.raises(KernelArgumentError):
        own.gemm(x, W_F32, torch.randn(4, 12))  # K % 8 != 0
    x = torch.randn(3, 32)
    codes = torch.zeros(4, 16, dtype=torch.uint8)
    s = torch.ones(4, 4)
    with pytest.raises(KernelArgumentError):
        own.gemm(x, W_INT4, codes, s, s, group=8)  # int4 groups are multiples of 16
    with pytest.raises(KernelArgumentError):
        own.gemm(x, W_INT8G, torch.zeros(4, 32, dtype=torch.int8), s, group=12)  # K % group != 0
    with pytest.raises(KernelArgumentError):
        own.gemm(x, 99, torch.randn(4, 32))  # no such format
    assert own.gemm(torch.randn(0, 32), W_F32, torch.randn(4, 32)).shape == (0, 4)


def _attention_args(ctx: list[int], block_size=4, blocks=2, H=4, KVH=2, D=16):
    q = torch.randn(len(ctx), H, D)
    cache = torch.randn(blocks * block_size * len(ctx), KVH, D)
    tables = torch.arange(blocks * len(ctx), dtype=torch.int64).view(len(ctx), blocks)
    return q, cache, cache.clone(), tables, torch.tensor(ctx, dtype=torch.int32), block_size


def test_attention_refuses_a_context_its_block_table_cannot_hold(own):
    q, k, v, tables, ctx, bs = _attention_args([3, 8])
    out = own.decode_attention(q, k, v, tables, ctx, bs, 0.25)  # fits: 8 = 2 blocks of 4
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    for bad in ([3, 9], [0, 2], [-1, 2]):  # past the table, empty, negative
        q, k, v, tables, ctx, bs = _attention_args(bad)
        with pytest.raises(KernelArgumentError):
            own.decode_attention(q, k, v, tables, ctx, bs, 0.25)
    q, k, v, tables, ctx, bs = _attention_args([3, 8], H=6, KVH=4)  # H % KVH != 0
    with pytest.raises(KernelArgumentError):
        own.decode_attention(q, k, v, tables, ctx, bs, 0.25)


def test_prefill_attention_refuses_items_outside_their_requests(own):
    q, k, v, tables, ctx, bs = _attention_args([3, 8])
    q = torch.randn(5, 4, 16)  # 2 tokens of request 0, 3 of request 1
    qlen = torch.tensor([2, 3], dtype=torch.int32)
    first = torch.tensor([0, 2], dtype=torch.int64)
    good = torch.tensor([[0, 0], [1, 0]], dtype=torch.int64)
    assert own.prefill_attention(q, k, v, tables, ctx, (qlen, first, good), bs, 0.25).shape == (5, 64)
    for items, lens in ((torch.tensor([[2, 0]]), qlen), (torch.tensor([[0, 5]]), qlen),
                        (good, torch.tensor([4, 3], dtype=torch.int32))):  # no request 2; token 5 of 2; qlen > ctx
        with pytest.raises(KernelArgumentError):
            own.prefill_attention(q, k, v, tables, ctx, (lens, first, items.to(torch.int64)), bs, 0.25)
