"""Mixtral (MixtralForCausalLM): the Llama decoder (Mistral's, with its sliding window capping the
context) whose MLP is a sparse mixture of experts (keel/layers/moe.py): a router over
num_local_experts SwiGLU experts, num_experts_per_tok of them run per token, their top-k weights
renormalized to sum to 1.

Checkpoints come in two layouts, both loaded:
- per expert, as on the hub and as transformers' save_pretrained writes them:
  model.layers.N.block_sparse_moe.gate.weight, ...block_sparse_moe.experts.E.w1/w2/w3.weight;
- stacked, as transformers 5 holds them in memory: model.layers.N.mlp.gate.weight,
  ...mlp.experts.gate_up_proj [E, 2*inter, hidden] (gate rows, then up rows), ...mlp.experts.down_proj
  [E, hidden, inter]; normalize_tensors splits these into the per-expert names.
The model's modules sit under the per-expert names (model.layers.N.block_sparse_moe.experts.E, each
Llama's MLP: packed_modules fuses w1 and w3 into its gate_up_proj and maps w2 to its down_proj), so
both layouts, keel's quantized copies and adapter error messages speak them.

LoRA adapts the attention projections (q_proj, k_proj, v_proj, o_proj). An adapter on the router or
the experts is refused with a LoRAError: one naming them as modules (w1, w2, w3, gate: PEFT with
transformers 4) by the target, one from PEFT with transformers 5 ("all-linear" included, which adapts
the MoE block through target_parameters) for its target_parameters. keel/layers/moe.py says why.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from keel.errors import ModelLoadError
from keel.layers.moe import SparseMoE
from keel.layers.norm import RMSNorm
from keel.models.config import ModelConfig
from keel.models.llama import MLP, DecoderLayer, LlamaForCausalLM

# transformers' (hence MixtralConfig's) defaults, for a config.json that leaves them out
DEFAULT_EXPERTS, DEFAULT_TOP_K = 8, 2
_STACKED = re.compile(r"(?P<layer>.*\.layers\.\d+)\.mlp\."
                      r"(?P<part>gate\.weight|experts\.gate_up_proj|experts\.down_proj)")


def mixtral_moe(cfg: ModelConfig, dtype, device) -> SparseMoE:
    raw = cfg.extra
    num_experts = raw.get("num_local_experts") or raw.get("num_experts") or DEFAULT_EXPERTS
    top_k = raw.get("num_experts_per_tok") or DEFAULT_TOP_K
    return SparseMoE(cfg.hidden_size, int(num_experts), int(top_k), lambda: MLP(cfg, dtype, device),
                     renormalize=True, dtype=dtype, device=device)


class MixtralDecoderLayer(DecoderLayer):
    """Llama's layer with the sparse MoE block where the MLP was, under the checkpoint's name for it."""

    def __init__(self, cfg: ModelConfig, dtype, device) -> None:
        nn.Module.__init__(self)
        self.self_attn = self.attention_cls(cfg, dtype, device)
        self.block_sparse_moe = mixtral_moe(cfg, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, x, rope, meta, lora=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, lora)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer
    # checkpoint projection -> (layer, shard): q/k/v fused as in Llama; each expert's w1 (gate) and w3
    # (up) fused into its gate_up_proj, w2 is its down_proj
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "w1": ("gate_up_proj", "gate"), "w3": ("gate_up_proj", "up"), "w2": ("down_proj", None),
    }

    @staticmethod
    def normalize_tensors(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """A checkpoint's tensors under the per-expert names: stacked experts split, one expert at a time
        (views of the stacked tensor, no copies), everything else as it comes."""
        for name, tensor in tensors:
            m = _STACKED.fullmatch(name)
            if m is None:
                yield name, tensor
                continue
            moe, part = f"{m['layer']}.block_sparse_moe", m["part"]
            if part == "gate.weight":
                yield f"{moe}.gate.weight", tensor
                continue
            if tensor.dim() != 3 or (part.endswith("gate_up_proj") and tensor.shape[1] % 2):
                raise ModelLoadError(f"{name} has shape {tuple(tensor.shape)}: stacked experts should be "
                                     "[experts, 2 * intermediate, hidden] (gate_up_proj) or "
                                     "[experts, hidden, intermediate] (down_proj)")
            for e, w in enumerate(tensor):
                if part.endswith("down_proj"):
                    yield f"{moe}.experts.{e}.w2.weight", w
                else:
                    gate, up = w.chunk(2)
                    yield f"{moe}.experts.{e}.w1.weight", gate
                    yield f"{moe}.experts.{e}.w3.weight", up

    def build_decode_stack(self) -> None:
        """keel's one-call decode stack runs Llama's dense MLP only: MoE layers go module by module."""
        from keel.kernels.backend import of
        self.decode_stack = False
        of(self).record("decode step", "module by module")
