"""keel.layers.attention's eager path (Scores: soft-capping, sliding window, ALiBi) against a direct
per-request computation, batched and one query at a time, and its batch invariance."""

from __future__ import annotations

import math

import pytest
import torch

from keel.layers.attention import AttentionMetadata, PagedAttention, Scores, alibi_slopes

H, KVH, D, BS = 4, 2, 8, 4


def _setup(scores: Scores, every_token: bool, seed: int = 0):
    attn = PagedAttention(H, KVH, D, D ** -0.5, scores)
    attn.k_cache = torch.zeros(64 * BS, KVH, D)
    attn.v_cache = torch.zeros(64 * BS, KVH, D)
    attn.every_token = every_token
    return attn


def _reference(q, keys, values, qpos, scores: Scores) -> torch.Tensor:
    """One request: q [Q, H, D] at positions qpos, keys/values [L, KVH, D] at positions 0..L-1."""
    out = []
    for t, p in enumerate(qpos):
        rows = []
        for h in range(H):
            kv = h // (H // KVH)
            s = (keys[: p + 1, kv] @ q[t, h]) * D ** -0.5
            if scores.alibi is not None:
                s = s + scores.alibi[h] * (torch.arange(p + 1) - p)
            if scores.softcap is not None:
                s = scores.softcap * torch.tanh(s / scores.softcap)
            if scores.window is not None:
                s[: max(0, p + 1 - scores.window)] = -math.inf
            rows.append(torch.softmax(s, 0) @ values[: p + 1, kv])
        out.append(torch.cat(rows))
    return torch.stack(out)


def _run(attn, reqs, seed=0):
    """reqs: [(cached tokens, new tokens)] -> (output [T, H*D], per request (q, keys, values, qpos))."""
    g = torch.Generator().manual_seed(seed)
    tables, next_block, qs, ks, vs, qlens, clens, info = [], 1, [], [], [], [], [], []
    for cached, new in reqs:
        c = cached + new
        nb = -(-c // BS)
        tables.append(list(range(next_block, next_block + nb)))
        next_block += nb
        keys, values = torch.randn(c, KVH, D, generator=g), torch.randn(c, KVH, D, generator=g)
        q = torch.randn(new, H, D, generator=g)
        # the cached tokens are already in their slots; the new ones are written by the layer
        slots = [tables[-1][p // BS] * BS + p % BS for p in range(c)]
        attn.k_cache[slots[:cached]] = keys[:cached]
        attn.v_cache[slots[:cached]] = values[:cached]
        qs.append(q), ks.append(keys[cached:]), vs.append(values[cached:])
        qlens.append(new), clens.append(c)
        info.append((q, keys, values, list(range(cached, c))))
    meta = AttentionMetadata.build(qlens, clens, tables, BS, torch.device("cpu"))
    out = attn(torch.cat(qs), torch.cat(ks), torch.cat(vs), meta)
    return out, info


CASES = {
    "window": Scores(window=5),
    "softcap": Scores(softcap=2.0),
    "alibi": Scores(alibi=alibi_slopes(H)),
    "all": Scores(softcap=3.0, window=6, alibi=alibi_slopes(H)),
}


@pytest.mark.parametrize("every_token", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_matches_direct_computation(case, every_token):
    attn = _setup(CASES[case], every_token)
    # a decode step, a prefill from scratch, a prefill chunk after cached tokens, mixed in one step
    out, info = _run(attn, [(11, 1), (0, 9), (7, 5)])
    rows = out.split([len(i[3]) for i in info])
    for got, (q, keys, values, qpos) in zip(rows, info):
        want = _reference(q, keys, values, qpos, CASES[case])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_huge_window_equals_plain_attention():
    plain, _ = _run(_setup(Scores(), False), [(11, 1), (0, 9), (7, 5)])
    wide, _ = _run(_setup(Scores(window=10_000), False), [(11, 1), (0, 9), (7, 5)])
    torch.testing.assert_close(wide, plain, rtol=1e-5, atol=1e-5)


def test_one_query_at_a_time_is_batch_invariant():
    scores = Scores(softcap=3.0, window=6, alibi=alibi_slopes(H))
    alone, _ = _run(_setup(scores, True), [(7, 5)])
    mixed, _ = _run(_setup(scores, True), [(7, 5), (0, 9), (30, 1)])
    assert torch.equal(alone, mixed[:5])


def test_slopes_of_power_of_two_heads_agree_between_styles():
    assert alibi_slopes(8) == alibi_slopes(8, interleave_rest=True)
    assert alibi_slopes(8)[0] == 0.5 and alibi_slopes(8)[-1] == 2.0 ** -8
