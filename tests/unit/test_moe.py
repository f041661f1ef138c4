"""keel/layers/moe.py: the grouped expert computation against a naive per-token reference and against
transformers' MixtralSparseMoeBlock; which experts run, and on how many rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel.errors import UnsupportedModelError
from keel.layers.linear import Linear
from keel.layers.moe import SparseMoE

HIDDEN, INTER = 32, 48
MAX_BF16_ROUNDED_OTHERWISE = 0.01  # fraction of outputs


class Expert(nn.Module):
    """A SwiGLU MLP of keel Linear layers, as Mixtral's experts are."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = Linear(HIDDEN, {"gate": INTER, "up": INTER})
        self.down = Linear(INTER, HIDDEN)
        for lin in (self.gate_up, self.down):
            nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def make_moe(num_experts: int, top_k: int, renormalize: bool = True, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(HIDDEN, num_experts, top_k, Expert, renormalize=renormalize)
    # routers this wide leave no near-ties for the two computations' summation orders to break differently
    nn.init.normal_(moe.gate.weight, std=3 * HIDDEN ** -0.5)
    return moe


def naive(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: route, run each chosen expert on the token alone, add the weighted outputs."""
    out = []
    for t in range(x.shape[0]):
        row = x[t:t + 1]
        probs = torch.softmax((row @ moe.gate.weight.t()).float()[0], dim=-1)
        w, chosen = probs.topk(moe.top_k)
        if moe.renormalize:
            w = w / w.sum()
        out.append(sum(w[j] * moe.experts[int(e)](row)[0].float() for j, e in enumerate(chosen)))
    return torch.stack(out).to(x.dtype)


def count_calls(moe: SparseMoE) -> dict[int, list[int]]:
    """expert index -> the row counts of its calls, filled as the block runs."""
    calls: dict[int, list[int]] = {}
    for i, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, i=i: calls.setdefault(i, []).append(inp[0].shape[0]))
    return calls


@pytest.mark.parametrize("tokens", [1, 2, 7, 33])
@pytest.mark.parametrize("num_experts,top_k,renormalize", [(4, 2, True), (8, 2, True), (3, 1, True), (8, 3, False)])
def test_grouped_equals_token_by_token(tokens, num_experts, top_k, renormalize):
    moe = make_moe(num_experts, top_k, renormalize)
    x = torch.randn(tokens, HIDDEN)
    with torch.no_grad():
        want, (_, chosen) = naive(moe, x), moe.route(x)
        calls = count_calls(moe)
        got = moe(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # one call per expert that some token chose, over all of that expert's rows; none for the others
    rows = torch.bincount(chosen.flatten(), minlength=num_experts).tolist()
    assert calls == {e: [n] for e, n in enumerate(rows) if n}


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("tokens", [1, 16])
def test_every_token_choosing_the_same_experts(tokens, top_k):
    """Tokens along one direction that two experts' router rows favour: every token picks those two (in
    order), so two of eight experts run, each once over every token."""
    moe = make_moe(8, top_k)
    u = torch.randn(HIDDEN)
    u /= u.norm()
    with torch.no_grad():
        moe.gate.weight[5] += 20 * u
        moe.gate.weight[2] += 16 * u
    x = u + 0.05 * torch.randn(tokens, HIDDEN)
    with torch.no_grad():
        want, (weights, chosen) = naive(moe, x), moe.route(x)
        calls = count_calls(moe)
        got = moe(x)
    assert (chosen == torch.tensor([5, 2][:top_k])).all()
    assert calls == {e: [tokens] for e in [5, 2][:top_k]}
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_mixtral_block(dtype):
    """The same weights in transformers' MixtralSparseMoeBlock: the routing (softmax in float32, top-k,
    renormalized) and the combination (float32 weights, shares rounded to the model dtype) agree: to
    float32 rounding, and in bfloat16 nearly bit for bit (a softmax taken in bfloat16 instead changes a
    quarter of the outputs)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    moe = make_moe(4, 2)
    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2)
    hf = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(moe.gate.weight)
        for e, expert in enumerate(moe.experts):
            hf.experts.gate_up_proj[e].copy_(expert.gate_up.weight)
            hf.experts.down_proj[e].copy_(expert.down.weight)
    moe, hf = moe.to(dtype), hf.to(dtype)
    x = torch.randn(2, 9, HIDDEN).to(dtype)
    with torch.no_grad():
        got, want = moe(x.view(-1, HIDDEN)), hf(x).view(-1, HIDDEN)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # bfloat16 keeps 8 significant bits
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if dtype == torch.bfloat16:  # a matmul over rows in another order may round an output the other way
        assert (got != want).float().mean() <= MAX_BF16_ROUNDED_OTHERWISE


def test_no_tokens():
    moe = make_moe(4, 2)
    assert moe(torch.empty(0, HIDDEN)).shape == (0, HIDDEN)


def test_top_k_must_fit_the_experts():
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=3"):
        SparseMoE(HIDDEN, 2, 3, Expert)
