"""Tiny checkpoints for the quantization tests: Hugging Face folders (from tests/models) and GGUF files
whose projections are stored in GGUF's block formats."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from tests.models.conftest import make_checkpoint

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2  # every width a multiple of 64
HEAD_DIM = HIDDEN // HEADS
TOKENS = ["<|endoftext|>", "<s>"] + sorted(pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """case name -> folder of a tiny random Hugging Face checkpoint, made once per session."""
    root = tmp_path_factory.mktemp("quant-ckpt")
    made = {}

    def get(case: str = "llama-gqa") -> str:
        if case not in made:
            made[case] = str(root / case)
            make_checkpoint(made[case], case)
        return made[case]
    return get


def write_gguf(path, projection_type: gguf.GGMLQuantizationType, seed: int = 0,
               embedding_type: gguf.GGMLQuantizationType | None = None) -> dict[str, np.ndarray]:
    """A two-layer llama GGUF file (tied embeddings) with every projection in `projection_type`, the token
    embedding in `embedding_type` (None: float32), the rest float32. Returns the dequantized
    quantized weights by GGUF name (in GGUF's row order)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", LAYERS), ("context_length", 256), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    stored = {}
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN), f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
                       f"blk.{i}.ffn_up.weight": (FFN, HIDDEN), f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
                       f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,)})
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        data = (rng.standard_normal(shape) / shape[1] ** 0.5).astype(np.float32)
        qtype = projection_type if name.startswith("blk.") else embedding_type
        if qtype is not None:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(q, qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def make_wide_checkpoint(folder: str) -> None:
    """A tiny llama whose every width is a multiple of 128, so all int4 group sizes fit."""
    import torch
    import transformers

    from tests.models.conftest import BASE, write_tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**BASE, "hidden_size": 128, "intermediate_size": 256})
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    write_tokenizer(folder)
