"""Mistral: the Llama decoder; its sliding window is handled by capping the context length."""

from keel.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
