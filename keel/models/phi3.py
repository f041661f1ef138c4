"""Phi-3, Phi-3.5 and Phi-4: the Llama decoder with q, k and v in one checkpoint projection (qkv_proj)
and gate and up in another (gate_up_proj), LongRoPE scaling, partial rotary (Phi-4-mini) and, in some
checkpoints, a sliding window.

The fused projections stay one Linear each with the checkpoint's row order (q rows, k rows, v rows;
gate rows, up rows), which is what the decoder computes anyway: nothing is split at load, and PEFT
adapters that name qkv_proj or gate_up_proj adapt exactly those layers."""

from __future__ import annotations

from keel.layers.attention import Scores
from keel.models.config import ModelConfig
from keel.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM


class Phi3Attention(Attention):
    split_in_checkpoint = False

    def scores(self, cfg: ModelConfig) -> Scores:
        # Applied exactly: a query sees the `sliding_window` keys up to itself, however long the context.
        return Scores(window=cfg.sliding_window)


class Phi3MLP(MLP):
    split_in_checkpoint = False


class Phi3DecoderLayer(DecoderLayer):
    attention_cls = Phi3Attention
    mlp_cls = Phi3MLP


class Phi3ForCausalLM(LlamaForCausalLM):
    layer_cls = Phi3DecoderLayer
    packed_modules = {}  # the checkpoint's projections are the model's
    window_caps_context = False

    @staticmethod
    def normalize_config(raw: dict) -> dict:
        """Phi-3 keeps the pretraining length at the top level (original_max_position_embeddings) and older
        checkpoints call LongRoPE "su" or "yarn"; keel's rotary reads both from the scaling dict."""
        for key in ("rope_scaling", "rope_parameters"):
            scaling = raw.get(key)
            if not isinstance(scaling, dict):
                continue
            scaling = dict(scaling)
            if scaling.get("type") in ("su", "yarn") or scaling.get("rope_type") in ("su", "yarn"):
                scaling["rope_type"] = "longrope"
                scaling.pop("type", None)
            if "original_max_position_embeddings" in raw:
                scaling.setdefault("original_max_position_embeddings", raw["original_max_position_embeddings"])
            raw[key] = scaling
        return raw
