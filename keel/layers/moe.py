"""A sparse mixture-of-experts block (Mixtral's): a router scores the experts for each token, the
top_k best run on it, and their outputs are summed, weighted by the router's probabilities.

The experts run grouped, never token by token: the step's (token, choice) pairs are sorted by expert,
each expert that received rows runs once over all of them (one matmul per projection), and the
results go back to their tokens. An expert no token chose costs nothing, so a step's expert work
follows the experts its tokens use, not how many the model has (bench/moe.py).

Each expert is a module of keel Linear layers (Mixtral's: Llama's SwiGLU MLP), so the backend picks
their kernels and int8/int4 quantization swaps them like any projection. The router stays in full
precision (see Router). LoRA cannot adapt the block: an adapter's update is laid out by the step's
token order (keel.lora.layers.LoRAMetadata), which the expert grouping reorders, and PEFT adapts a
transformers 5 MoE block only through target_parameters (its experts are stacked tensors there), which
keel refuses for every model. keel.lora.adapter.BaseTargets reads `lora_unsupported` and refuses
adapters that name the router or an expert's projections (as PEFT wrote them for transformers 4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from keel.errors import UnsupportedModelError
from keel.layers.linear import Linear


class Router(Linear):
    """hidden -> one logit per expert, no bias. A Linear, so it gets the backend's matmul, but a subclass:
    keel.quant.convert swaps only plain Linear layers, so the router keeps full precision under int8 and
    int4, as llama.cpp and vLLM keep it. Its weight is a sliver of the model (experts x hidden), and a
    quantization error there changes which experts run, not just how exactly they compute."""


class SparseMoE(nn.Module):
    lora_unsupported = "LoRA on a mixture-of-experts block (its router and experts) is not supported"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, make_expert: Callable[[], nn.Module],
                 renormalize: bool = True, dtype: torch.dtype | None = None, device=None) -> None:
        """make_expert() -> a module mapping rows [n, hidden] -> [n, hidden]; renormalize: the top_k
        probabilities are rescaled to sum to 1 (Mixtral) rather than kept as the softmax gave them."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise UnsupportedModelError(f"num_experts_per_tok={top_k} must be between 1 and the number of experts "
                                        f"(num_local_experts={num_experts})")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate = Router(hidden_size, num_experts, dtype=dtype, device=device)
        self.experts = nn.ModuleList(make_expert() for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, top_k] float32, experts [T, top_k] int64), best expert first.
        The softmax and the renormalization run in float32 whatever the model dtype (as transformers
        does): in bfloat16 near-equal probabilities would round together and flip the top-k choice."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        # x: [T, hidden]; lora is not applied here (see the module docstring: BaseTargets refuses it)
        weights, experts = self.route(x)
        chosen = experts.flatten()  # [T*k]: pair p is token p // k, choice p % k
        # Stable: within an expert, rows keep token order (a row's result does not depend on the others,
        # the Linear layers being batch-invariant; the order only keeps runs reproducible).
        order = torch.argsort(chosen, stable=True)
        counts = torch.bincount(chosen, minlength=self.num_experts).tolist()  # one host sync per layer
        token = order // self.top_k  # [T*k] token of each pair, grouped by expert
        rows, shares = x.index_select(0, token), weights.flatten()[order].unsqueeze(1)
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                end = start + n
                # Weighted in float32, each share rounded to the model dtype and added to its token in
                # expert order: transformers' order and dtypes. No token appears twice in one expert's rows,
                # so each addition has one destination row.
                y = expert(rows[start:end]) * shares[start:end]
                out.index_add_(0, token[start:end], y.to(x.dtype))
                start = end
        return out
