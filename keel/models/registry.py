"""Architecture name (config.json "architectures") -> model class, imported when first asked for."""

from __future__ import annotations

import importlib

from keel.errors import UnsupportedModelError

# architecture -> (module, class)
FAMILIES = {
    "LlamaForCausalLM": ("keel.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("keel.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("keel.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("keel.models.qwen3", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("keel.models.phi3", "Phi3ForCausalLM"),
    "Gemma2ForCausalLM": ("keel.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("keel.models.gemma", "Gemma3ForCausalLM"),
    "MixtralForCausalLM": ("keel.models.mixtral", "MixtralForCausalLM"),
    "FalconForCausalLM": ("keel.models.falcon", "FalconForCausalLM"),
    "MptForCausalLM": ("keel.models.mpt", "MptForCausalLM"),
}
# The same decoders saved without their output head (as embedding models such as Qwen3-Embedding
# are): their tensors lack the "model." prefix, and only an embedding model may lack lm_head.
FAMILIES.update({"LlamaModel": FAMILIES["LlamaForCausalLM"], "MistralModel": FAMILIES["MistralForCausalLM"],
                 "Qwen2Model": FAMILIES["Qwen2ForCausalLM"], "Qwen3Model": FAMILIES["Qwen3ForCausalLM"]})


def supported() -> list[str]:
    return sorted(FAMILIES)


def model_class(architecture: str):
    try:
        module, name = FAMILIES[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported())}") from None
    return getattr(importlib.import_module(module), name)
