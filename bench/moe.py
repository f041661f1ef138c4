"""What a sparse MoE layer (keel/layers/moe.py) costs against which experts its tokens use, in one run.

One Mixtral-style block (8 SwiGLU experts, top-2, keel's kernels chosen as the engine chooses them) is
timed with the same tokens routed three ways, and a dense SwiGLU MLP of the same per-token active size
(intermediate = top_k x the expert's) next to it:

- concentrated: every token picks the same 2 experts (2 of 8 run, each over every token);
- spread: token t picks experts 2t mod 8 and 2t+1 mod 8 (all 8 run, each over a quarter of the tokens);
- dense: the MLP over every token.

All three do the same arithmetic per token. At decode sizes the weights each step reads dominate: an
engine whose cost followed the number of experts (not the number used) would show no gap between
concentrated and spread, and a per-token loop would be far behind dense.

    .venv/bin/python -m bench.moe [--out bench/results/moe.md]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.decode import machine
from bench.kernels import best_times
from bench.report import publish
from keel.kernels.backend import choose
from keel.layers.linear import Linear
from keel.models.config import ModelConfig
from keel.models.llama import MLP
from keel.models.mixtral import mixtral_moe

HIDDEN, INTER, EXPERTS, TOP_K = 1024, 1792, 8, 2
TOKENS = (4, 16, 128)  # decode batches (4: the fewest that reach every expert), a prefill chunk
ROUTE_LOGIT = 10.0  # router weight on each expert's own input channel: routing leaves no doubt


def config(intermediate: int) -> ModelConfig:
    return ModelConfig.from_hf({
        "architectures": ["MixtralForCausalLM"], "vocab_size": 32, "hidden_size": HIDDEN,
        "intermediate_size": intermediate, "num_hidden_layers": 1, "num_attention_heads": 8,
        "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K})


def prepared(module: torch.nn.Module, backend) -> torch.nn.Module:
    """The module's layers given their kernels as LlamaForCausalLM.prepare gives them."""
    for m in module.modules():
        m.backend = backend
    for m in module.modules():
        if isinstance(m, Linear):
            with torch.no_grad():
                m.weight.normal_(std=m.in_features ** -0.5)
            m.pack_for_cpu()
        if isinstance(m, MLP):
            m.prepare()
    return module


def tokens_for(pairs: list[tuple[int, int]]) -> torch.Tensor:
    """One token per (first, second) expert pair: the router (ROUTE_LOGIT on channel e for expert e) puts
    its two experts far ahead of the rest."""
    x = 0.01 * torch.randn(len(pairs), HIDDEN)
    for t, (a, b) in enumerate(pairs):
        x[t, a] += 1.0
        x[t, b] += 0.9
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    backend = choose(torch.device("cpu"), torch.float32)
    moe = prepared(mixtral_moe(config(INTER), torch.float32, "cpu"), backend)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :EXPERTS] = ROUTE_LOGIT * torch.eye(EXPERTS)
    dense = prepared(MLP(config(TOP_K * INTER), torch.float32, "cpu"), backend)
    rows = [f"# bench/moe.py\n\nMachine: {machine()}; {time.strftime('%Y-%m-%d')}; {backend.describe()}", "",
            (f"One MoE layer: hidden {HIDDEN}, {EXPERTS} experts of intermediate {INTER}, top-{TOP_K}; dense MLP "
             f"of intermediate {TOP_K * INTER}. Milliseconds per call (best of interleaved runs)."), "",
            "| tokens | 2 of 8 experts | all 8 experts | dense MLP | all 8 / 2 of 8 | 2 of 8 / dense |",
            "|---|---|---|---|---|---|"]
    for n in TOKENS:
        concentrated = tokens_for([(0, 1)] * n)
        spread = tokens_for([(2 * t % EXPERTS, (2 * t + 1) % EXPERTS) for t in range(n)])
        with torch.no_grad():
            used = [sorted(set(moe.route(x)[1].flatten().tolist())) for x in (concentrated, spread)]
        assert used == [[0, 1], list(range(EXPERTS))], used
        with torch.inference_mode():
            runs = [lambda x=concentrated: moe(x), lambda x=spread: moe(x), lambda x=concentrated: dense(x)]
            a, b, c = best_times(runs, rounds=9, calls=10 if n <= 16 else 3)
        rows.append(f"| {n} | {a * 1e3:.2f} | {b * 1e3:.2f} | {c * 1e3:.2f} | {b / a:.2f}x | {a / c:.2f}x |")
    rows += ["", ("Every column does the same arithmetic per token. all 8 / 2 of 8: what reading the weights of "
                  "every expert instead of two costs (the most where a step reads weights more than it computes); "
                  "2 of 8 / dense: the routing, the grouping and the smaller matmuls of two experts against one MLP.")]
    publish(rows, args.out)


if __name__ == "__main__":
    main()
