"""Gemma 2 and Gemma 3 (text only): the Llama decoder's projections with Gemma's changes.

- token embeddings scaled by sqrt(hidden_size), the factor rounded to the model dtype first (as the reference
  does: 55.43 becomes 55.5 in bfloat16);
- RMSNorm scaling by 1 + weight (OffsetRMSNorm), four per layer: before attention, on the attention output
  before its residual add, before the MLP, on the MLP output before its residual add;
- a GeGLU MLP (gelu with the tanh approximation, named by `hidden_activation`);
- attention scaled by query_pre_attn_scalar ** -0.5 rather than head_dim ** -0.5;
- local layers attending over a sliding window and global layers over the whole context, by the config's
  `layer_types` or the family's default pattern. The attention applies the window exactly (Scores.window),
  so, unlike Mistral, the context length is not capped at the window;
- Gemma 2: attention scores and final logits soft-capped, c * tanh(x / c);
- Gemma 3: an OffsetRMSNorm on each query and key head before rotary, local layers rotating with their own
  table (rope_local_base_freq) and global ones with rope_theta and its scaling (linear x8 in the 4B and up);
  the final logits soft-capped where the config says so.

Local and global layers keep the same KV cache layout (every layer caches the whole context).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from keel.errors import ModelLoadError, UnsupportedModelError
from keel.layers.attention import AttentionMetadata, PagedAttention, Scores
from keel.layers.norm import OffsetRMSNorm
from keel.layers.rotary import RotaryEmbedding, scaling_kind
from keel.lora.layers import LoRAMetadata
from keel.models.config import ModelConfig
from keel.models.llama import MLP, Attention, LlamaForCausalLM

SLIDING, FULL = "sliding_attention", "full_attention"
LOCAL_ROPE = "keel_local_rope"  # the key normalize_config files the local layers' rope settings under


class Gemma2Attention(Attention):
    soft_caps_scores = True  # Gemma 3's reference never passes attn_logit_softcapping to its attention

    def __init__(self, cfg: ModelConfig, dtype, device, sliding: bool) -> None:
        super().__init__(cfg, dtype, device)
        H, KVH, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        if self.qk_norm:
            self.q_norm = OffsetRMSNorm(D, eps, dtype, device)
            self.k_norm = OffsetRMSNorm(D, eps, dtype, device)
        extra = cfg.extra
        scores = Scores(softcap=extra["attn_logit_softcapping"] if self.soft_caps_scores else None,
                        window=cfg.sliding_window if sliding else None)
        # A layer with a Scores that is not plain runs the eager attention, and PagedAttention then never
        # takes keel's CPU kernel (nor the fused rotary+cache pass that comes with it).
        self.attn = PagedAttention(H, KVH, D, extra["query_pre_attn_scalar"] ** -0.5, scores, device)


class Gemma3Attention(Gemma2Attention):
    qk_norm = True
    soft_caps_scores = False


class Gemma2DecoderLayer(nn.Module):
    attention_cls = Gemma2Attention

    def __init__(self, cfg: ModelConfig, dtype, device, sliding: bool) -> None:
        super().__init__()
        self.sliding = sliding
        self.self_attn = self.attention_cls(cfg, dtype, device, sliding)
        self.mlp = MLP(cfg, dtype, device)
        self.input_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.pre_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, x, rope, meta, lora=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, meta, lora))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), lora))


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_cls = Gemma3Attention


class Gemma2ForCausalLM(LlamaForCausalLM):
    layer_cls = Gemma2DecoderLayer
    window_caps_context = False  # the sliding layers apply their window themselves (Scores.window)
    global_every = 2  # without layer_types: every second layer is global, the others local
    # transformers' defaults for keys a config.json may leave out
    defaults: ClassVar[dict] = {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0,
                                "sliding_window": 4096, "tie_word_embeddings": True}

    @classmethod
    def normalize_config(cls, raw: dict) -> dict:
        if raw.get("use_bidirectional_attention"):
            raise UnsupportedModelError("use_bidirectional_attention=true (an embedding Gemma) is not supported: "
                                        "keel's Gemma attention is causal")
        for key, value in cls.defaults.items():
            raw.setdefault(key, value)
        # transformers reads only hidden_activation for these families; some configs also carry a stale hidden_act
        raw["hidden_act"] = raw.get("hidden_activation") or "gelu_pytorch_tanh"
        n = raw.get("num_hidden_layers")
        kinds = raw.get("layer_types")
        if kinds is None and isinstance(n, int):
            every = raw.get("sliding_window_pattern") or cls.global_every
            kinds = [FULL if (i + 1) % every == 0 else SLIDING for i in range(n)]
        if kinds is not None:
            unknown = sorted(set(kinds) - {SLIDING, FULL})
            if unknown:
                raise UnsupportedModelError(f"layer_types {unknown} are not supported (supported: {SLIDING}, {FULL})")
            if len(kinds) != n:
                raise ModelLoadError(f"layer_types lists {len(kinds)} layers, num_hidden_layers is {n}")
            raw["layer_types"] = list(kinds)
        return raw

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device) -> None:
        # The decoder builds the embedding, head and global rotary table; the layers here depend on their
        # index (local or global), so they are built below rather than by the decoder.
        super().__init__(dataclasses.replace(cfg, num_layers=0), max_positions, dtype, device)
        self.config = cfg
        self.model.layers = nn.ModuleList(self.layer_cls(cfg, dtype, device, kind == SLIDING)
                                          for kind in cfg.extra["layer_types"])
        self.model.norm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.local_rotary = self._local_rotary(cfg, max_positions, device)
        # sqrt(hidden_size) rounded to the model dtype, the factor the reference multiplies by (bfloat16: 55.5)
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype).item()
        self.final_softcap = cfg.extra.get("final_logit_softcapping")

    def _local_rotary(self, cfg: ModelConfig, max_positions: int, device) -> RotaryEmbedding | None:
        return None  # Gemma 2's local layers rotate as its global ones do

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora: LoRAMetadata | None = None) -> torch.Tensor:
        x, ropes = self.layer_inputs(input_ids, positions)
        for layer, rope in zip(self.model.layers, ropes):
            x = layer(x, rope, meta, lora)
        return self.model.norm(x)

    def layer_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, list]:
        rope = {False: self.rotary.lookup(positions)}  # by layer.sliding
        rope[True] = rope[False] if self.local_rotary is None else self.local_rotary.lookup(positions)
        return self.embed(input_ids), [rope[layer.sliding] for layer in self.model.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> scaled embeddings [T, hidden] in the model dtype."""
        x = self.model.embed_tokens(input_ids)
        if x.dtype != self.dtype:  # an embedding table held in bfloat16 under a float32 model
            x = x.to(self.dtype)
        return x * self.embed_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)  # float32
        if self.final_softcap is None:
            return logits
        return torch.tanh(logits / self.final_softcap) * self.final_softcap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    layer_cls = Gemma3DecoderLayer
    global_every = 6  # sliding_window_pattern's default
    defaults: ClassVar[dict] = {"query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
                                "final_logit_softcapping": None,
                                "sliding_window": 4096, "tie_word_embeddings": True}
    local_theta, global_theta = 10_000.0, 1_000_000.0  # transformers' defaults

    @classmethod
    def normalize_config(cls, raw: dict) -> dict:
        """The global layers' rope settings become the config's own (rope_parameters: theta and scaling), the
        local layers' go under LOCAL_ROPE. transformers 5 writes one rope_parameters dict per layer type;
        older configs have rope_theta and rope_scaling for the global layers and rope_local_base_freq."""
        raw = super().normalize_config(raw)
        rope = raw.get("rope_parameters") or {}
        if SLIDING in rope or FULL in rope:
            full, local = dict(rope.get(FULL) or {}), dict(rope.get(SLIDING) or {})
        else:
            scaling = dict(raw.get("rope_scaling") or {})
            if "type" in scaling:  # the older name of rope_type
                scaling.setdefault("rope_type", scaling.pop("type"))
            full = {"rope_type": "default", **rope, **scaling}
            full.setdefault("rope_theta", raw.get("rope_theta", cls.global_theta))
            local = {"rope_type": "default", "rope_theta": raw.get("rope_local_base_freq", cls.local_theta)}
        full.setdefault("rope_theta", cls.global_theta)
        local.setdefault("rope_theta", cls.local_theta)
        raw["rope_parameters"], raw[LOCAL_ROPE] = full, local
        raw.pop("rope_scaling", None)
        raw.pop("rope_theta", None)
        return raw

    def _local_rotary(self, cfg: ModelConfig, max_positions: int, device) -> RotaryEmbedding:
        local = cfg.extra[LOCAL_ROPE]
        scaling = local if scaling_kind(local) != "default" else None
        return RotaryEmbedding(cfg.head_dim, max_positions, float(local["rope_theta"]), scaling, device,
                               None, cfg.max_position_embeddings)
