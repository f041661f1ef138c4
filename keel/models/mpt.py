"""MPT (MptForCausalLM): LayerNorms, one fused Wqkv projection, a non-gated GELU MLP, ALiBi positions.

keel follows the config as MosaicML's MPT defines it, where transformers' port hard-codes values:
`no_bias: false` puts biases on every projection and LayerNorm, `expansion_ratio` sizes the MLP,
`attn_config.alibi_bias_max` sets the slopes, and `attn_config.alibi: false` means learned position
embeddings (transformer.wpe) instead of ALiBi. (transformers' MptForCausalLM always builds no biases, a 4x
MLP and ALiBi with maximum bias 8.) Settings that change the computation and are not implemented are
refused when the config is read."""

from __future__ import annotations

import torch
from torch import nn

from keel.errors import UnsupportedModelError
from keel.layers.attention import AttentionMetadata, PagedAttention, Scores, alibi_slopes
from keel.layers.linear import Linear
from keel.layers.norm import LayerNorm
from keel.lora.layers import LoRAMetadata
from keel.models.config import ModelConfig
from keel.models.falcon import GeluMLP, TransformerLM

# transformers' MptAttentionConfig defaults, for an attn_config that leaves keys out
ATTN_DEFAULTS = {"attn_type": "multihead_attention", "clip_qkv": None, "softmax_scale": None, "prefix_lm": False,
                 "qk_ln": False, "alibi": True, "alibi_bias_max": 8}
NORM_TYPES = ("low_precision_layernorm", "layernorm")  # both a LayerNorm at inference


class MptAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        super().__init__()
        H, D, a = cfg.num_heads, cfg.head_dim, cfg.extra["attn_config"]
        self.num_heads, self.head_dim, self.clip = H, D, a["clip_qkv"]
        self.Wqkv = Linear(cfg.hidden_size, 3 * H * D, bias=cfg.attention_bias, dtype=dtype, device=device)
        self.out_proj = Linear(H * D, cfg.hidden_size, bias=cfg.attention_bias, dtype=dtype, device=device)
        scale = a["softmax_scale"] if a["softmax_scale"] is not None else D ** -0.5
        # MPT adds slope * (key - query position) after scaling, as keel's Scores does: the slopes as they are
        scores = Scores(alibi=alibi_slopes(H, a["alibi_bias_max"], interleave_rest=True)) if a["alibi"] else None
        self.attn = PagedAttention(H, H, D, scale, scores, device)

    def forward(self, x: torch.Tensor, rope, meta: AttentionMetadata,
                lora: LoRAMetadata | None = None) -> torch.Tensor:
        qkv = self.Wqkv(x, lora)
        if self.clip:  # clamped after any adapter's update: PEFT's wraps Wqkv, the clamp comes after it
            qkv = qkv.clamp(-self.clip, self.clip)
        q, k, v = qkv.view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        return self.out_proj(self.attn(q, k, v, meta), lora)


class MptBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        super().__init__()
        hidden, eps, bias = cfg.hidden_size, cfg.rms_norm_eps, cfg.mlp_bias
        self.norm_1 = LayerNorm(hidden, eps, bias, dtype, device)
        self.attn = MptAttention(cfg, dtype, device)
        self.norm_2 = LayerNorm(hidden, eps, bias, dtype, device)
        self.ffn = GeluMLP(hidden, cfg.intermediate_size, bias, cfg.hidden_act, dtype, device)

    def forward(self, x, rope, meta, lora=None):
        x = x + self.attn(self.norm_1(x), rope, meta, lora)
        return x + self.ffn(self.norm_2(x), lora)


class MptForCausalLM(TransformerLM):
    parts = ("wte", "blocks", "norm_f")
    layer_cls = MptBlock

    @staticmethod
    def normalize_config(raw: dict) -> dict:
        """MPT's keys (d_model, n_heads, n_layers, expansion_ratio, max_seq_len, no_bias, attn_config) under
        Llama's; what keel does not implement refused with the reason."""
        a = {**ATTN_DEFAULTS, **(raw.get("attn_config") or {})}
        ffn_type = (raw.get("ffn_config") or {}).get("ffn_type", "mptmlp")
        norm_type = raw.get("norm_type", NORM_TYPES[0])
        refused = {
            "attn_config.attn_type": a["attn_type"] != "multihead_attention" and a["attn_type"],
            "attn_config.qk_ln": a["qk_ln"],
            "attn_config.prefix_lm": a["prefix_lm"],
            "attn_config.rope": a.get("rope"),
            "logit_scale": raw.get("logit_scale"),
            "norm_type": norm_type not in NORM_TYPES and norm_type,
            "ffn_config.ffn_type": ffn_type != "mptmlp" and ffn_type,
        }
        for key, value in refused.items():
            if value:
                raise UnsupportedModelError(f"MPT with {key}={value!r} is not supported")
        raw["attn_config"] = a
        for key, old in (("hidden_size", "d_model"), ("num_attention_heads", "n_heads"),
                         ("num_hidden_layers", "n_layers"), ("max_position_embeddings", "max_seq_len")):
            if raw.get(key) is None and old in raw:
                raw[key] = raw[old]
        heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
        if heads and hidden:
            raw["head_dim"] = hidden // heads
            raw["num_key_value_heads"] = heads
            raw["intermediate_size"] = raw.get("expansion_ratio", 4) * hidden
        raw["rms_norm_eps"] = raw.get("layer_norm_epsilon", 1e-5)  # the norm epsilon ModelConfig carries
        raw["hidden_act"] = "gelu"  # exact GELU, not configurable in MPT
        raw["attention_bias"] = raw["mlp_bias"] = not raw.get("no_bias", True)
        # MptConfig's defaults, for a config.json that leaves them out
        raw.setdefault("max_position_embeddings", 2048)
        raw.setdefault("tie_word_embeddings", True)
        return raw

    @property
    def final_norm_bias(self) -> bool:
        return self.config.mlp_bias

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device) -> None:
        super().__init__(cfg, max_positions, dtype, device)
        if not cfg.extra["attn_config"]["alibi"]:
            # MosaicML's MPT without ALiBi learns one embedding per position up to max_seq_len; the engine
            # serves no longer context (max_position_embeddings).
            self.transformer.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                                device=device)
            self.transformer.wpe.weight.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids, positions)
        wpe = getattr(self.transformer, "wpe", None)
        return x if wpe is None else x + wpe(positions).to(x.dtype)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.attn.attn for layer in self.transformer.blocks]
