"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from keel.errors import UnsupportedModelError
from keel.models.llama import LlamaForCausalLM
from keel.models.mistral import MistralForCausalLM
from keel.models.qwen2 import Qwen2ForCausalLM
from keel.models.qwen3 import Qwen3ForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
# The same decoders saved without their output head (as embedding models such as Qwen3-Embedding
# are): their tensors lack the "model." prefix, and only an embedding model may lack lm_head.
MODELS.update({"LlamaModel": LlamaForCausalLM, "MistralModel": MistralForCausalLM,
               "Qwen2Model": Qwen2ForCausalLM, "Qwen3Model": Qwen3ForCausalLM})


def model_class(architecture: str):
    try:
        return MODELS[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODELS))}") from None
