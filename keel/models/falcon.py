"""Falcon (FalconForCausalLM): Falcon-7B (multi-query, parallel attention and MLP), Falcon-40B/180B/11B
(the new decoder architecture: grouped key/value heads, one or two LayerNorms in parallel) and Falcon-RW
(ALiBi, biases, attention then MLP). Also the parts MPT shares: a non-gated GELU MLP and the model class
(`TransformerLM`) whose decoder keeps the checkpoint's own names under `transformer`.

The fused query_key_value projection stays one Linear with the checkpoint's row order, so PEFT adapters
that target it load as they are. Every variant lays those rows out per key/value group: the group's query
heads, then its key head, then its value head (Falcon-7B: one group; Falcon-RW: one group per head)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from keel.errors import UnsupportedModelError
from keel.layers.activation import activation
from keel.layers.attention import AttentionMetadata, PagedAttention, Scores, alibi_slopes
from keel.layers.linear import Linear
from keel.layers.norm import LayerNorm
from keel.layers.rotary import RotaryEmbedding
from keel.lora.layers import LoRAMetadata
from keel.models.config import ModelConfig
from keel.models.llama import LlamaForCausalLM


class GeluMLP(nn.Module):
    """down(act(up(x))), no gate: Falcon's and MPT's feed-forward. `names` are the checkpoint's names of
    the two projections, which are also the names PEFT adapters target."""
    names = ("up_proj", "down_proj")

    def __init__(self, hidden: int, inter: int, bias: bool, act: str, dtype, device) -> None:
        super().__init__()
        up, down = self.names
        setattr(self, up, Linear(hidden, inter, bias=bias, dtype=dtype, device=device))
        setattr(self, down, Linear(inter, hidden, bias=bias, dtype=dtype, device=device))
        self.act = activation(act)

    def forward(self, x: torch.Tensor, lora: LoRAMetadata | None = None) -> torch.Tensor:
        up, down = (getattr(self, n) for n in self.names)
        return down(self.act(up(x, lora)), lora)


class TransformerLM(LlamaForCausalLM):
    """A decoder kept under `transformer` with its checkpoint's names (`parts`: embedding, layers, final
    LayerNorm), so checkpoint tensors and PEFT module names are the model's own, nothing renamed. The
    output head, CPU packing and kernel choices are LlamaForCausalLM's, which reads the decoder through
    `model` (Llama's names); its __init__ is not used: it builds Llama's layout."""
    parts: tuple[str, str, str]  # the family's names of the embedding, the layer list and the final norm
    checkpoint_prefix = "transformer."  # keel.models.loader: what a tensor name without a known prefix lacks
    packed_modules = {}  # the checkpoint's projections are the model's
    layer_cls: type[nn.Module]
    final_norm_bias = True

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device) -> None:
        nn.Module.__init__(self)
        self.config, self.dtype, self.max_positions = cfg, dtype, max_positions
        embed, layers, norm = self.parts
        self.transformer = nn.Module()
        emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        emb.weight.requires_grad_(False)
        setattr(self.transformer, embed, emb)
        blocks = nn.ModuleList(self.layer_cls(cfg, dtype, device) for _ in range(cfg.num_layers))
        setattr(self.transformer, layers, blocks)
        final = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, self.final_norm_bias, dtype, device)
        setattr(self.transformer, norm, final)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype,
                                                                    device=device)
        self.tied_head: Linear | None = None  # see LlamaForCausalLM.pack_for_cpu
        self.decode_stack = False  # keel's one-call decode stack runs Llama's layers only
        self.rotary = self.make_rotary(cfg, max_positions, device)

    @property
    def embedding_name(self) -> str:
        """The token embedding's module path (keel.quant.convert quantizes it there)."""
        return f"transformer.{self.parts[0]}"

    @property
    def layers_prefix(self) -> str:
        """Where the decoder's projections live (keel.lora.adapter.BaseTargets looks there)."""
        return f"transformer.{self.parts[1]}."

    @property
    def model(self) -> SimpleNamespace:
        """The decoder under Llama's names, for the methods inherited from LlamaForCausalLM."""
        embed, layers, norm = (getattr(self.transformer, p) for p in self.parts)
        return SimpleNamespace(embed_tokens=embed, layers=layers, norm=norm)

    def make_rotary(self, cfg: ModelConfig, max_positions: int, device) -> RotaryEmbedding | None:
        return None  # ALiBi: positions enter the attention scores

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return x if x.dtype == self.dtype else x.to(self.dtype)  # a bfloat16 table under a float32 model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora: LoRAMetadata | None = None) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden states [T, hidden]
        parts = self.model
        x, ropes = self.layer_inputs(input_ids, positions)
        for layer, rope in zip(parts.layers, ropes):
            x = layer(x, rope, meta, lora)
        return parts.norm(x)

    def layer_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, list]:
        rope = None if self.rotary is None else self.rotary.lookup(positions)
        return self.embed(input_ids, positions), [rope] * len(self.model.layers)

    def build_decode_stack(self) -> None:
        from keel.kernels.backend import of
        of(self).record("decode step", "module by module")


def falcon_alibi(num_heads: int, head_dim: int) -> tuple[float, ...]:
    """Falcon's ALiBi slopes (BLOOM's formula, maximum bias 8) as keel's Scores takes them. Falcon rounds
    each slope to bfloat16 (as the code it was trained with did) and adds slope * key position BEFORE it
    scales the scores by 1/sqrt(head_dim); keel adds slope * (key - query position) after scaling (the
    per-query shift leaves the softmax unchanged), so the slopes carry that scale. (transformers also rounds
    each slope * position to bfloat16, exact below 256 positions for power-of-two slopes; keel's biases stay
    exact past that.)"""
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32).bfloat16().float()
    return tuple((slopes * head_dim ** -0.5).tolist())


class FalconAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        super().__init__()
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, KVH, D
        self.query_key_value = Linear(cfg.hidden_size, (H + 2 * KVH) * D, bias=cfg.attention_bias, dtype=dtype,
                                      device=device)
        self.dense = Linear(H * D, cfg.hidden_size, bias=cfg.attention_bias, dtype=dtype, device=device)
        scores = Scores(alibi=falcon_alibi(H, D)) if cfg.extra["alibi"] else None
        self.attn = PagedAttention(H, KVH, D, D ** -0.5, scores, device)

    def forward(self, x: torch.Tensor, rope, meta: AttentionMetadata,
                lora: LoRAMetadata | None = None) -> torch.Tensor:
        T, H, KVH, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        G = H // KVH  # query heads per key/value head
        qkv = self.query_key_value(x, lora).view(T, KVH, G + 2, D)  # per group: G query heads, key, value
        # query head h reads key head h // G, the order keel's attention assumes
        q, k, v = qkv[:, :, :G].reshape(T, H, D), qkv[:, :, G], qkv[:, :, G + 1]
        if rope is not None:
            q, k = RotaryEmbedding.apply(rope, q), RotaryEmbedding.apply(rope, k)
        return self.dense(self.attn(q, k, v, meta), lora)


class FalconMLP(GeluMLP):
    names = ("dense_h_to_4h", "dense_4h_to_h")


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        super().__init__()
        e, hidden, eps = cfg.extra, cfg.hidden_size, cfg.rms_norm_eps
        self.parallel = e["parallel_attn"]
        self.self_attention = FalconAttention(cfg, dtype, device)
        self.mlp = FalconMLP(hidden, cfg.intermediate_size, cfg.mlp_bias, cfg.hidden_act, dtype, device)
        # Falcon's LayerNorms always have a bias, whatever `bias` says of the projections.
        self.two_norms = e["num_ln_in_parallel_attn"] == 2
        if self.two_norms:  # Falcon-40B/180B: one norm before the attention, one before the MLP
            self.ln_attn = LayerNorm(hidden, eps, True, dtype, device)
            self.ln_mlp = LayerNorm(hidden, eps, True, dtype, device)
        else:
            self.input_layernorm = LayerNorm(hidden, eps, True, dtype, device)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(hidden, eps, True, dtype, device)

    def forward(self, x, rope, meta, lora=None):
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, rope, meta, lora)
        if not self.parallel:  # Falcon-RW: attention, then the MLP on its result
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x), lora)
        return x + (self.mlp(mlp_in, lora) + attn)


class FalconForCausalLM(TransformerLM):
    parts = ("word_embeddings", "h", "ln_f")
    layer_cls = FalconDecoderLayer

    @staticmethod
    def normalize_config(raw: dict) -> dict:
        """Falcon's keys (and the older RW names n_embed, n_head, n_layer, n_head_kv) under Llama's, with
        the layout settled once: the true number of key/value heads (1 for multi-query, every head for
        Falcon-RW: what the KV cache holds), parallel attention and the number of LayerNorms."""
        if raw.get("apply_residual_connection_post_layernorm"):
            raise UnsupportedModelError("Falcon with apply_residual_connection_post_layernorm=true is not supported "
                                        "(transformers' Falcon does not implement it either)")
        for key, old in (("hidden_size", "n_embed"), ("num_attention_heads", "n_head"),
                         ("num_hidden_layers", "n_layer"), ("num_kv_heads", "n_head_kv")):
            if raw.get(key) is None and old in raw:
                raw[key] = raw[old]
        new = bool(raw.get("new_decoder_architecture", False))
        heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
        if heads and hidden:
            raw["head_dim"] = hidden // heads
            if new:
                raw["num_key_value_heads"] = raw.get("num_kv_heads") or heads
            else:
                raw["num_key_value_heads"] = 1 if raw.get("multi_query", True) else heads
            raw["intermediate_size"] = raw.get("ffn_hidden_size") or 4 * hidden
        raw["new_decoder_architecture"] = new
        raw["alibi"] = bool(raw.get("alibi", False))
        # The new decoder always runs attention and MLP in parallel, with two norms unless told one.
        raw["parallel_attn"] = new or bool(raw.get("parallel_attn", True))
        raw["num_ln_in_parallel_attn"] = (raw.get("num_ln_in_parallel_attn") or 2) if new else 1
        raw["rms_norm_eps"] = raw.get("layer_norm_epsilon", 1e-5)  # the norm epsilon ModelConfig carries
        raw["hidden_act"] = raw.get("activation", "gelu")
        raw["attention_bias"] = raw["mlp_bias"] = bool(raw.get("bias", False))
        # FalconConfig's defaults, for a config.json that leaves them out
        raw.setdefault("max_position_embeddings", 2048)
        raw.setdefault("tie_word_embeddings", True)
        raw.setdefault("bos_token_id", 11)
        raw.setdefault("eos_token_id", 11)
        return raw

    def make_rotary(self, cfg: ModelConfig, max_positions: int, device) -> RotaryEmbedding | None:
        if cfg.extra["alibi"]:
            return None
        return RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device,
                               cfg.rotary_dim, cfg.max_position_embeddings)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attention.attn for layer in self.transformer.h]
