"""BERT-family encoders (BERT, MiniLM, the sentence-transformers models built on them), our own
implementation: word + position + token-type embeddings, post-norm layers of bidirectional attention
and a GELU MLP. Tokens run packed (no padding) through every projection; only attention pads them to
the batch's longest sequence, with the padding masked out.

Weights come from the Hugging Face `BertModel` layout (with or without a `bert.` prefix); the pooler
and any task heads are not loaded (sentence embeddings pool the last hidden states themselves).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from keel.errors import ModelLoadError


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, act: str) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor, shape: tuple[int, int], real: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x [N, H]: the batch's real tokens, packed. Only attention sees the padded [B, T] layout
        (`real` indexes the real tokens in it; None when nothing is padded)."""
        b, t = shape
        n, d = x.shape
        qkv = self.qkv(x)
        if real is not None:
            padded = qkv.new_zeros(b * t, 3 * d)
            padded[real] = qkv
            qkv = padded
        q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b * t, d)
        if real is not None:
            a = a[real]
        x = self.attn_norm(x + self.attn_out(a))
        h = self.up(x)
        h = F.gelu(h, approximate="tanh" if self.act in ("gelu_new", "gelu_pytorch_tanh") else "none")
        return self.mlp_norm(x + self.down(h))


class BertEncoder(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        try:
            hidden, heads = config["hidden_size"], config["num_attention_heads"]
            self.num_layers = config["num_hidden_layers"]
            intermediate, vocab = config["intermediate_size"], config["vocab_size"]
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks {e.args[0]!r}, which a BERT model needs") from None
        act = config.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ModelLoadError(f"hidden_act={act!r} is not supported for BERT models (gelu only)")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"position_embedding_type={config['position_embedding_type']!r} is not supported")
        if hidden % heads:
            raise ModelLoadError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        eps = config.get("layer_norm_eps", 1e-12)
        self.hidden_size = hidden
        self.max_positions = config.get("max_position_embeddings", 512)
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(self.max_positions, hidden)
        self.token_type = nn.Embedding(max(1, config.get("type_vocab_size", 2)), hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, intermediate, eps, act) for _ in range(self.num_layers))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, T] (padded), lengths [B] -> last hidden states [B, T, H] (padding rows are zeros).

        The projections and MLPs, nearly all of the work, run on the real tokens only, packed: with
        texts of mixed lengths a padded batch would spend most of its time on padding."""
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device)
        keep = pos[None, :] < lengths[:, None]  # [B, T] real tokens
        padded = not bool(keep.all())
        real = keep.view(-1).nonzero().squeeze(1) if padded else None
        flat_ids = ids.view(-1) if real is None else ids.view(-1)[real]
        flat_pos = pos.repeat(b) if real is None else pos.repeat(b)[real]
        x = self.norm(self.word(flat_ids) + self.position(flat_pos) + self.token_type.weight[0])
        mask = None
        if padded:
            mask = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=x.device)
            mask.masked_fill_(~keep[:, None, None, :], -math.inf)
        for layer in self.layers:
            x = layer(x, (b, t), real, mask)
        if real is None:
            return x.view(b, t, -1)
        out = x.new_zeros(b * t, x.shape[-1])
        out[real] = x
        return out.view(b, t, -1)

    # -- weights ---------------------------------------------------------------------------------
    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Hugging Face BertModel names -> this module; every needed tensor must be there, in shape."""
        tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
        names = {"word.weight": "embeddings.word_embeddings.weight",
                 "position.weight": "embeddings.position_embeddings.weight",
                 "token_type.weight": "embeddings.token_type_embeddings.weight",
                 "norm.weight": "embeddings.LayerNorm.weight", "norm.bias": "embeddings.LayerNorm.bias"}
        for i in range(self.num_layers):
            p, q = f"layers.{i}.", f"encoder.layer.{i}."
            for ours, theirs in (("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                 ("up", "intermediate.dense"), ("down", "output.dense"),
                                 ("mlp_norm", "output.LayerNorm")):
                for kind in ("weight", "bias"):
                    names[f"{p}{ours}.{kind}"] = f"{q}{theirs}.{kind}"
        state = {}
        for ours, theirs in names.items():
            state[ours] = _take(tensors, theirs)
        for i in range(self.num_layers):
            q = f"encoder.layer.{i}.attention.self."
            for kind in ("weight", "bias"):
                state[f"layers.{i}.qkv.{kind}"] = torch.cat([_take(tensors, f"{q}{n}.{kind}")
                                                             for n in ("query", "key", "value")])
        own = self.state_dict()
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise ModelLoadError(f"tensor for {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict(state)


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ModelLoadError(f"the checkpoint lacks tensor {name!r}")
    return tensors[name]
