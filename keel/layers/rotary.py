"""Rotary position embeddings (the rotate-half layout of Hugging Face checkpoints), with scaling.

A family may rotate only the first `rotary_dim` channels of each head (Phi-4-mini, Falcon variants),
scale cos and sin by an attention factor (LongRoPE), and use different tables in different layers
(Gemma 3's local and global layers): each is one RotaryEmbedding the model looks up once per step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from keel.errors import UnsupportedModelError

SCALINGS = ("default", "linear", "llama3", "longrope")


def scaling_kind(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None, max_positions: int | None = None,
                    trained_positions: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], attention factor cos and sin are scaled by). max_positions:
    the longest context the engine serves; trained_positions: the checkpoint's max_position_embeddings
    (LongRoPE reads both)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling_kind(scaling)
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old_len / low, inv / factor, inv)
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, out), 1.0
    if kind == "longrope":
        # Per-frequency stretch factors: "short" ones for contexts within the pretraining length, "long" ones
        # beyond it. Transformers switches per forward pass by the longest position in it, which would
        # make a token's keys depend on what came later; keel picks once, by the longest context it
        # serves (as vLLM does): an engine capped at the pretraining length matches transformers on
        # every sequence, a longer one on every sequence that passes the pretraining length.
        trained = scaling.get("original_max_position_embeddings") or trained_positions
        factors = scaling["long_factor"] if max_positions and max_positions > trained else scaling["short_factor"]
        if len(factors) != head_dim // 2:
            raise UnsupportedModelError(f"longrope scaling has {len(factors)} factors for {head_dim // 2} frequencies")
        factor = scaling.get("factor") or (trained_positions or trained) / trained
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(factor) / math.log(trained)) if factor > 1 else 1.0
        return inv / torch.tensor(factors, dtype=torch.float64), float(attention)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: {', '.join(SCALINGS)})")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 device=None, rotary_dim: int | None = None, trained_positions: int | None = None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        self.partial = self.rotary_dim < head_dim
        inv, attention = inv_frequencies(self.rotary_dim, theta, scaling, max_positions, trained_positions)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)
        # cos/sin tables in float32: positions beyond a few thousand lose precision in bfloat16.
        self.register_buffer("cos", (freqs.cos() * attention).float().to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attention).float().to(device), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, rotary_dim / 2] for a step's positions [T]: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, D] (query and key heads together); only the first 2 * cos.shape[-1] channels turn
        rot = 2 * rope[0].shape[-1]
        if rot < x.shape[-1]:
            return torch.cat((_rotate(x[..., :rot], *rope), x[..., rot:]), dim=-1)
        return _rotate(x, *rope)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
