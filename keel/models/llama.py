"""Llama 2/3 and the decoder the other families build on (Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keel.layers.activation import activation
from keel.layers.attention import AttentionMetadata, PagedAttention
from keel.layers.linear import Linear, keeps_bf16
from keel.layers.norm import RMSNorm
from keel.layers.rotary import RotaryEmbedding
from keel.lora.layers import LoRAMetadata
from keel.models.config import ModelConfig


class Attention(nn.Module):
    qkv_bias = False  # Qwen2 turns this on
    qk_norm = False  # Qwen3 turns this on
    split_in_checkpoint = True  # q_proj, k_proj and v_proj are separate tensors in the checkpoint

    def scores(self, cfg: ModelConfig):
        """What this family does to the attention scores (keel.layers.attention.Scores): nothing here."""
        return None

    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        super().__init__()
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size, self.num_heads, self.num_kv_heads, self.head_dim = H * D, KVH * D, H, KVH, D
        # q, k and v fused into one matmul: one weight read and one kernel call instead of three (a checkpoint
        # that stores them fused already, as Phi-3's does, loads into it whole).
        out = {"q": H * D, "k": KVH * D, "v": KVH * D} if self.split_in_checkpoint else (H + 2 * KVH) * D
        self.qkv_proj = Linear(cfg.hidden_size, out, bias=self.qkv_bias or cfg.attention_bias, dtype=dtype,
                               device=device)
        self.o_proj = Linear(H * D, cfg.hidden_size, bias=cfg.attention_bias, dtype=dtype, device=device)
        if self.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, device)
        self.attn = PagedAttention(H, KVH, D, D ** -0.5, self.scores(cfg), device)

    def forward(self, x: torch.Tensor, rope, meta: AttentionMetadata,
                lora: LoRAMetadata | None = None) -> torch.Tensor:
        T, H, KVH, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x, lora)
        own = self.attn.own  # keel's CPU kernels for a float32 cache (see PagedAttention.use_own_kernel)
        if (own is not None and not self.qk_norm and qkv.is_contiguous() and rope[0].is_contiguous()
                and 2 * rope[0].shape[-1] == D):
            # One pass: q and k rotated in place, k and v written to their cache slots.
            own.rope_and_cache(qkv, rope[0], rope[1], meta.slot_mapping, self.attn.k_cache, self.attn.v_cache, H, KVH)
            qkv = qkv.view(T, H + 2 * KVH, D)
            out = self.attn(qkv[:, :H], qkv[:, H:H + KVH], qkv[:, H + KVH:], meta, cached=True)
            return self.o_proj(out, lora)
        qkv = qkv.view(T, H + 2 * KVH, D)
        qk, v = qkv[:, :H + KVH], qkv[:, H + KVH:]
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1)
        # q and k heads sit side by side in the fused output: one rotation covers both.
        qk = RotaryEmbedding.apply(rope, qk)
        return self.o_proj(self.attn(qk[:, :H], qk[:, H:], v, meta), lora)


class MLP(nn.Module):
    split_in_checkpoint = True  # gate_proj and up_proj are separate tensors in the checkpoint

    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.act_name, self.act = cfg.hidden_act, activation(cfg.hidden_act)
        out = {"gate": self.inter, "up": self.inter} if self.split_in_checkpoint else 2 * self.inter
        self.gate_up_proj = Linear(cfg.hidden_size, out, bias=cfg.mlp_bias, dtype=dtype, device=device)
        self.down_proj = Linear(self.inter, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype, device=device)

    own = None  # keel's CPU kernels (keel.kernels.cpu) once checked; False: not used
    backend = None  # keel.kernels.backend.Backend, set by the model's prepare()

    def prepare(self) -> None:
        from keel.kernels.backend import of
        backend = of(self)
        on_cpu = backend.device.type == "cpu"
        self.own = (backend.cpu_kernels() if on_cpu and self.act_name in ("silu", "swish") else None) or False
        backend.record(f"{self.act_name}_mul", f"keel {self.own.isa}" if self.own else "torch")

    def forward(self, x: torch.Tensor, lora: LoRAMetadata | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, lora)
        if self.own is None:
            self.prepare()
        if self.own and gate_up.dtype == torch.float32 and gate_up.is_contiguous():
            return self.down_proj(self.own.silu_mul(gate_up), lora)  # one pass, no split, no temporaries
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(self.act(gate) * up, lora)


class DecoderLayer(nn.Module):
    attention_cls = Attention
    mlp_cls = MLP

    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, dtype, device)
        self.mlp = self.mlp_cls(cfg, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, x, rope, meta, lora=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class LlamaForCausalLM(nn.Module):
    layer_cls = DecoderLayer
    # A config's sliding_window caps the context length (Mistral: within the window full attention is
    # exact); families whose attention applies the window itself (Scores.window) set this False.
    window_caps_context = True
    # checkpoint projection -> (fused layer, shard)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }

    @staticmethod
    def normalize_config(raw: dict) -> dict:
        """A family whose config.json names things differently maps them to Llama's keys here."""
        return raw

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.max_positions = max_positions  # the longest context this instance serves (its tables' length)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device,
                                      cfg.rotary_dim, cfg.max_position_embeddings)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.model.embed_tokens.weight.requires_grad_(False)
        self.model.layers = nn.ModuleList(self.layer_cls(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device)
        self.tied_head: Linear | None = None  # a packed copy of the tied embedding, see pack_for_cpu
        self.decode_stack = None  # keel.models.fused_decode.DecodeStack once built (False: not used here)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora: LoRAMetadata | None = None) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden states [T, hidden]; lora: the step's adapter slots, if any
        x, ropes = self.layer_inputs(input_ids, positions)
        if self.decode_stack and self.decode_stack.runs(x, meta, lora):
            return self.model.norm(self.decode_stack.run(x, ropes[0], meta, lora))  # one call for every layer
        for layer, rope in zip(self.model.layers, ropes):
            x = layer(x, rope, meta, lora)
        return self.model.norm(x)

    def layer_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(the first layer's input [T, hidden] in the model dtype, each layer's rotary cos/sin): what the
        layers take, for forward and for the fine-tuning trainer, which runs them one by one."""
        x = self.model.embed_tokens(input_ids)
        if x.dtype != self.dtype:  # an embedding table held in bfloat16 under a float32 model
            x = x.to(self.dtype)
        return x, [self.rotary.lookup(positions)] * len(self.model.layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Logits in float32: sampling and log-probabilities want the precision.
        if self.tied_head is not None:
            return self.tied_head(hidden).float()
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def prepare(self, backend, weight_dtype: str | None = "auto") -> None:
        """Give every layer the engine's backend and let each choose its kernels, once; on a CPU the
        projections move into their kernels' layouts (pack_for_cpu)."""
        for m in self.modules():
            m.backend = backend
        if next(self.model.embed_tokens.parameters()).device.type == "cpu":
            self.pack_for_cpu(weight_dtype)
        for m in self.modules():
            if isinstance(m, (RMSNorm, MLP)):
                m.prepare()

    def build_decode_stack(self) -> None:
        """Build the one-call decode stack (keel/models/fused_decode.py) where every part of every layer
        runs on keel's CPU kernels; called once the weights, adapter stacks and KV caches are final."""
        from keel.kernels.backend import of
        from keel.models.fused_decode import DecodeStack
        backend = of(self)
        self.decode_stack = DecodeStack.build(self, backend) or False
        backend.record("decode step", "keel one call" if self.decode_stack else "module by module")

    def pack_for_cpu(self, weight_dtype: str | None = None) -> None:
        """Move every projection to the CPU's fastest matmul layout (see Linear.pack_for_cpu), its weight
        held in bfloat16 where weight_dtype says so (see keel.layers.linear.keeps_bf16). A tied output head
        gets a matmul layer over the embedding table: the same tensor where keel's kernel reads it as is,
        else a packed copy (the lookup still needs the plain table)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack_for_cpu(weight_dtype)
        emb = self.model.embed_tokens
        bf16 = isinstance(emb, nn.Embedding) and keeps_bf16(emb.weight, weight_dtype)
        if self.lm_head is None:
            head = Linear(self.config.hidden_size, self.config.vocab_size, dtype=emb.weight.dtype)
            head.weight.data = emb.weight.data
            head.backend = getattr(self, "backend", None)
            if bf16 and head._use_own(store_bf16=True):
                emb.weight.data = head.weight.data  # one bfloat16 table for lookups and head
                self.tied_head = head
            elif head.pack_for_cpu() or head.fixed_rows:
                self.tied_head = head
        elif bf16:
            emb.weight.data = emb.weight.data.bfloat16()  # lookups only: forward widens the rows

    def weight_bytes(self) -> int:
        """Bytes of weights held (a packed tied head counted once more)."""
        total = 0
        for name, p in self.named_parameters():
            total += p.numel() * p.element_size()
        for m in self.modules():
            if isinstance(m, Linear) and m.packed is not None:
                total += m.weight_bytes()
        return total

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]
