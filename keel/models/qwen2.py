"""Qwen2 and Qwen2.5: the Llama decoder with a bias on the q, k and v projections."""

from keel.models.llama import Attention, DecoderLayer, LlamaForCausalLM


class Qwen2Attention(Attention):
    qkv_bias = True


class Qwen2DecoderLayer(DecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer
