"""keel's CPU decode-step kernels (cpu_decode.c) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch

from keel.layers.attention import AttentionMetadata, PagedAttention


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 16), (6, 2, 128)])
def test_decode_kernel_matches_gather_and_sdpa(heads, kv_heads, head_dim):
    from keel.kernels.cpu import kernels
    if kernels() is None:
        pytest.skip("keel's CPU kernels need Linux, AVX2, FMA and a C compiler")
    g = torch.Generator().manual_seed(heads * head_dim)
    block_size, num_blocks = 4, 64
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim ** -0.5)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    attn.k_cache, attn.v_cache = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g)
    attn.use_own_kernel()
    assert attn.own is not None
    # requests with 1, 3, 4, 17 and 70 tokens in the cache after this step, blocks scattered in the pool
    context_lens = [1, 3, 4, 17, 70]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(perm[used:used + n])
        used += n
    meta = AttentionMetadata.build([1] * len(context_lens), context_lens, tables, block_size, torch.device("cpu"))
    T = len(context_lens)
    qk = torch.randn(T, heads + kv_heads, head_dim, generator=g) * 3  # q heads then k heads, as the models pass q
    q, k, v = qk[:, :heads], qk[:, heads:], torch.randn(T, kv_heads, head_dim, generator=g)
    caches = attn.k_cache.clone(), attn.v_cache.clone()
    got = attn(q, k, v, meta)
    attn.k_cache.copy_(caches[0])
    attn.v_cache.copy_(caches[1])
    attn.own = None
    want = attn(q, k, v, meta)
    assert got.shape == want.shape == (T, heads * head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_steps_with_longer_queries_keep_the_general_path():
    """Without batch invariance (every_token off) the decode kernel is for one query token per request: a
    step with a prefill chunk goes through SDPA."""
    class Refuse:
        def decode_attention(self, *args):
            raise AssertionError("decode kernel called for a prefill step")
    attn = PagedAttention(4, 2, 16, 0.25)
    attn.k_cache, attn.v_cache = torch.zeros(32, 2, 16), torch.zeros(32, 2, 16)
    attn.own = Refuse()
    meta = AttentionMetadata.build([1, 3], [5, 3], [[0, 1], [2]], 4, torch.device("cpu"))
    out = attn(torch.randn(4, 4, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16), meta)
    assert out.shape == (4, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 1, 16), (6, 2, 128)])
def test_prefill_kernel_gives_each_token_what_a_decode_step_gives_it(heads, kv_heads, head_dim):
    """Batch invariance of attention: tokens of prefill chunks (several per request, mixed with decode
    tokens) through keel's prefill entry point are bit for bit what the decode kernel gives the same token
    alone at its position, and close to SDPA."""
    from keel.kernels.cpu import kernels
    if kernels() is None:
        pytest.skip("keel's CPU kernels need Linux, AVX2, FMA and a C compiler")
    g = torch.Generator().manual_seed(heads + head_dim)
    block_size, num_blocks = 4, 96
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim ** -0.5)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    attn.k_cache, attn.v_cache = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g)
    attn.use_own_kernel()
    query_lens, context_lens = [1, 19, 5, 40, 1], [9, 19, 30, 70, 2]  # decodes, a whole prompt, chunks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for c in context_lens:
        n = -(-c // block_size)
        tables.append(perm[used:used + n])
        used += n
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, torch.device("cpu"))
    T = sum(query_lens)
    q = (torch.randn(T, heads + kv_heads, head_dim, generator=g) * 3)[:, :heads]
    got = attn.own.prefill_attention(q, attn.k_cache, attn.v_cache, meta.gather_blocks, meta.context_lens,
                                     meta.prefill_items(), block_size, attn.scale)
    t = 0
    for b, (ql, c) in enumerate(zip(query_lens, context_lens)):
        for i in range(ql):
            one = AttentionMetadata.build([1], [c - ql + i + 1], [tables[b]], block_size, torch.device("cpu"))
            alone = attn.own.decode_attention(q[t:t + 1], attn.k_cache, attn.v_cache, one.gather_blocks,
                                              one.context_lens, block_size, attn.scale)
            assert torch.equal(got[t], alone[0]), (b, i)
            t += 1
    want = attn._batched(q, meta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rope_and_cache_write_match_torch():
    """Rotary embedding of q and k in place plus the cache write, against keel's torch rotation and
    index_copy_; head_dim 20 leaves a remainder past the 8-wide vectors."""
    from keel.kernels.cpu import kernels
    from keel.layers.rotary import RotaryEmbedding
    own = kernels()
    if own is None:
        pytest.skip("keel's CPU kernels need Linux, AVX2, FMA and a C compiler")
    T, H, KVH, D = 5, 4, 2, 20
    g = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(D, 128, 10000.0, None).lookup(torch.tensor([0, 3, 7, 64, 127]))
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g)
    want = qkv.view(T, H + 2 * KVH, D).clone()
    want[:, :H + KVH] = RotaryEmbedding.apply(rope, want[:, :H + KVH])
    slots = torch.tensor([9, 2, 40, 41, 17])
    k_cache, v_cache = torch.zeros(64, KVH, D), torch.zeros(64, KVH, D)
    own.rope_and_cache(qkv, rope[0], rope[1], slots, k_cache, v_cache, H, KVH)
    torch.testing.assert_close(qkv.view(T, H + 2 * KVH, D), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_cache[slots], want[:, H:H + KVH], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_cache[slots], want[:, H + KVH:])
    assert k_cache.abs().sum(dim=(1, 2)).count_nonzero() == T  # nothing written elsewhere


def test_silu_mul_matches_torch():
    from keel.kernels.cpu import kernels
    own = kernels()
    if own is None:
        pytest.skip("keel's CPU kernels need Linux, AVX2, FMA and a C compiler")
    gate_up = torch.randn(7, 2 * 37, generator=torch.Generator().manual_seed(2)) * 20  # large |x| too
    gate, up = gate_up.split(37, dim=-1)
    torch.testing.assert_close(own.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, rtol=2e-6, atol=1e-6)
