"""Decode speed of each model family in keel against transformers `generate`, same run, same weights.

    .venv/bin/python -m bench.families [--new-tokens 32] [--families llama,phi3,...] [--out bench/results/families.md]

(also `python -m bench.decode --families`). Each family gets a tiny-but-not-trivial random checkpoint
(hidden 512, 4 layers, 8 heads, vocabulary 4096) saved with transformers; both sides decode greedily in
float32 from the same 16-token prompts at batch 1 and 8, best of 3. Mixtral (8 experts, top 2) is also
timed with its experts' intermediate size scaled so that its active parameters equal the dense Llama's:
its cost per token should then be close to Llama's, not 4x (it grows with active, not total, experts).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from bench.report import publish
from keel import LLM, SamplingParams

SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
REPEAT = 3

# name -> (config class, model class, config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SHAPE),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**SHAPE, "pad_token_id": 0}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**SHAPE, "head_dim": 64, "sliding_window": 256,
                                                     "query_pre_attn_scalar": 64, "pad_token_id": 0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**SHAPE, "head_dim": 64, "sliding_window": 256,
                                                         "query_pre_attn_scalar": 64, "pad_token_id": 0}),
    "mixtral (8 experts, top 2)": ("MixtralConfig", "MixtralForCausalLM",
                                   {**SHAPE, "num_local_experts": 8, "num_experts_per_tok": 2}),
    "mixtral, active = llama": ("MixtralConfig", "MixtralForCausalLM",
                                {**SHAPE, "intermediate_size": 704, "num_local_experts": 8, "num_experts_per_tok": 2}),
    "falcon (new decoder)": ("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_kv_heads=2,
        new_decoder_architecture=True, parallel_attn=True, bias=False, ffn_hidden_size=1408,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1)),
    "mpt (alibi)": ("MptConfig", "MptForCausalLM", dict(
        vocab_size=4096, d_model=512, n_layers=4, n_heads=8, max_seq_len=512,
        attn_config={"alibi": True}, bos_token_id=0, eos_token_id=1)),
}


def build(folder: str, cfg_name: str, model_name: str, config: dict):
    import transformers
    from tests.models.conftest import write_tokenizer
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**config)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(folder)
    write_tokenizer(folder)  # a word-level vocabulary of 256: prompts are token ids here anyway
    return model


def prompt_ids(batch: int) -> list[list[int]]:
    return [[(i * 37 + j * 11) % 4000 + 2 for j in range(16)] for i in range(batch)]


def time_keel(llm: LLM, batch: int, new: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(prompt_ids(batch), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    best = 0.0
    for _ in range(REPEAT):
        t = time.perf_counter()
        llm.generate(prompt_ids(batch), params)
        best = max(best, batch * new / (time.perf_counter() - t))
    return best


def time_hf(model, batch: int, new: int) -> float:
    ids = torch.tensor(prompt_ids(batch))
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    best = 0.0
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(REPEAT):
            t = time.perf_counter()
            model.generate(ids, **kw)
            best = max(best, batch * new / (time.perf_counter() - t))
    return best


def run(names: list[str], new: int, batches: list[int]) -> list[str]:
    from bench.decode import machine
    rows = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}",
            f"Random checkpoints (hidden 512, 4 layers, 8 heads, vocabulary 4096), float32, greedy, 16-token prompts, "
            f"{new} new tokens, best of {REPEAT}; keel with its defaults for float32 (batch-invariant).", "",
            "| family | " + " | ".join(f"keel b={b} tok/s | transformers b={b} | ratio" for b in batches) + " |",
            "|---|" + "---|---|---|" * len(batches)]
    with tempfile.TemporaryDirectory() as root:
        for name in names:
            cfg_name, model_name, config = FAMILIES[name]
            folder = os.path.join(root, name.split()[0] + str(len(os.listdir(root))))
            hf = build(folder, cfg_name, model_name, config)
            llm = LLM(folder, dtype="float32")
            ours = {b: time_keel(llm, b, new) for b in batches}
            del llm
            theirs = {b: time_hf(hf, b, new) for b in batches}
            cells = " | ".join(f"{ours[b]:.1f} | {theirs[b]:.1f} | {ours[b] / theirs[b]:.2f}x" for b in batches)
            rows.append(f"| {name} | {cells} |")
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--families", default=None, help="comma-separated first words of the rows (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    wanted = None if args.families is None else args.families.split(",")
    names = [n for n in FAMILIES if wanted is None or n.split()[0].rstrip(",") in wanted]
    publish(["# bench/families.py", ""] + run(names, args.new_tokens, [int(b) for b in args.batches.split(",")]),
            args.out)


if __name__ == "__main__":
    sys.exit(main())
