"""The activation functions of the supported families, by their Hugging Face config names."""

from __future__ import annotations

import functools

import torch.nn.functional as F

from keel.errors import UnsupportedModelError

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})") from None
