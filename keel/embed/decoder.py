"""Decoder embedding models (Qwen3-Embedding and the like): keel's own decoder (keel/models) run over
whole inputs with causal attention, its final hidden states pooled (last token by default).

The decoder's attention reads keys and values from a paged cache, so this owns a small one: each batch
gets contiguous blocks, written and read within the one forward pass. The cache grows to the largest
batch seen, up to MAX_CACHE_TOKENS; longer inputs are refused by EmbeddingModel's length check.
"""

from __future__ import annotations

import torch

from keel.layers.attention import AttentionMetadata
from keel.models.loader import build_model, open_checkpoint

BLOCK = 16
MAX_CACHE_TOKENS = 8192  # also the longest input keel embeds with a decoder (KV memory is per token)


class DecoderEncoder:
    def __init__(self, path: str, dtype: torch.dtype, device: torch.device) -> None:
        ckpt = open_checkpoint(path)
        cfg = ckpt.config
        self.config, self.device, self.dtype = cfg, device, dtype
        self.max_positions = min(cfg.max_position_embeddings, MAX_CACHE_TOKENS)
        self.model = build_model(ckpt, dtype, device, self.max_positions, headless=True)
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.tokenizer = ckpt.tokenizer
        self._blocks = 0

    def _ensure_cache(self, tokens: int) -> None:
        blocks = -(-tokens // BLOCK)
        if blocks <= self._blocks:
            return
        for attn in self.model.attention_layers():
            shape = (blocks * BLOCK, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._blocks = blocks

    def __call__(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, T] padded, lengths [B] -> final hidden states [B, T, H] (padding rows are zeros)."""
        lens = lengths.tolist()
        tables, start = [], 0
        for n in lens:
            k = -(-n // BLOCK)
            tables.append(list(range(start, start + k)))
            start += k
        self._ensure_cache(start * BLOCK)
        meta = AttentionMetadata.build(lens, lens, tables, BLOCK, self.device)
        flat = torch.cat([ids[i, :n] for i, n in enumerate(lens)]).to(self.device)
        pos = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        hidden = self.model(flat, pos, meta)
        out = torch.zeros(len(lens), ids.shape[1], self.hidden_size, dtype=hidden.dtype, device=hidden.device)
        offset = 0
        for i, n in enumerate(lens):
            out[i, :n] = hidden[offset:offset + n]
            offset += n
        return out
