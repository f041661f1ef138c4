"""The one linear layer every projection of every model goes through.

Quantized weight formats and LoRA adapters (later) plug in here: a layer knows its output slices
(q/k/v or gate/up when fused) so each can be loaded, quantized or adapted on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keel.errors import ModelLoadError


class Linear(nn.Module):
    """y = x Wᵀ + b, optionally several checkpoint projections fused along the output dimension.

    output_sizes: for a fused layer, checkpoint shard name -> rows (e.g. {"q": 576, "k": 192, "v": 192});
    None for a plain layer.
    """

    def __init__(self, in_features: int, out_features: int | dict[str, int], bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.output_sizes = dict(out_features) if isinstance(out_features, dict) else None
        out = sum(self.output_sizes.values()) if self.output_sizes else int(out_features)
        self.in_features, self.out_features = in_features, out
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.weight.weight_loader = self.load_weight
        if self.bias is not None:
            self.bias.weight_loader = self.load_bias

    def shard_slice(self, shard: str | None) -> slice:
        if shard is None or self.output_sizes is None:
            return slice(0, self.out_features)
        start = 0
        for name, size in self.output_sizes.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(shard)

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard: str | None, what: str) -> None:
        dst = param.data[self.shard_slice(shard)]
        if tuple(dst.shape) != tuple(loaded.shape):
            raise ModelLoadError(f"{what} shard {shard or ''} has shape {tuple(loaded.shape)}, "
                                 f"the model expects {tuple(dst.shape)}")
        dst.copy_(loaded)

    def load_weight(self, param, loaded, shard=None):
        self._load(param, loaded, shard, "weight")

    def load_bias(self, param, loaded, shard=None):
        self._load(param, loaded, shard, "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
