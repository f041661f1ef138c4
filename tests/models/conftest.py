"""Tiny random checkpoints in the Hugging Face format, one per family and corner, made with transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch

VOCAB = 256

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, bos_token_id=0, rms_norm_eps=1e-5)

# name -> (config class, model class, config overrides)
CASES = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
}


def write_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "t0", "eos_token": "t1"}, f)


def make_checkpoint(folder: str, case: str, seed: int = 0, shard_size: str | None = None):
    import transformers
    cfg_name, model_name, overrides = CASES[case]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).float().eval()
    # transformers initialises weights with std 0.02, biases to 0 and norms to 1: that would hide a
    # missing bias or norm and give logits too flat to compare. Randomise everything visibly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    write_tokenizer(folder)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """case name -> (folder, transformers model), built once per session."""
    root = tmp_path_factory.mktemp("ckpt")
    made = {}

    def get(case: str):
        if case not in made:
            folder = str(root / case)
            made[case] = (folder, make_checkpoint(folder, case))
        return made[case]
    return get
