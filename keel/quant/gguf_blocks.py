"""GGUF's 4-bit block formats straight into int4 groups of 32, without a detour through floats.

Q4_0 blocks are a float16 scale d and 32 codes, w = d * (code - 8); Q4_1 blocks a scale d, a minimum m
and 32 codes, w = d * code + m. Both are int4 with groups of 32 as keel holds it, w = (code - 8) * scale
+ zero: scale = d, zero = 0 (Q4_0) or m + 8 d (Q4_1). The only change is the rounding of scale and zero
to the kernels' bfloat16, at most 8 d / 256 + |zero| / 256 per weight
(bfloat16 keeps 8 significant bits): a small fraction of the step d.

Q8_0 (a scale per 32 int8 codes) is not kept as blocks: int8 here has one scale per output channel
(the layout the fast CPU kernel reads), so Q8_0 weights are dequantized and requantized per channel.
The extra rounding is at most half a per-channel step, the same error int8 adds to any weight; a
group-wise int8 layer would keep Q8_0 exact, but no PyTorch kernel computes with one, and
dequantize-then-matmul would be slower than the dense layer it replaces.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from keel.models.gguf import GGUFBlocks
from keel.quant.int4 import pack_nibbles

# (bytes per block of 32, bytes before the codes)
_LAYOUT = {GGMLQuantizationType.Q4_0: (18, 2), GGMLQuantizationType.Q4_1: (20, 4)}
DIRECT_TYPES = tuple(_LAYOUT)


def gguf_to_int4(blocks: GGUFBlocks) -> dict[str, torch.Tensor]:
    """Q4_0/Q4_1 blocks [rows, in / 32 blocks] -> {"qweight", "scales", "zeros"} of int4, group 32."""
    block_bytes, header = _LAYOUT[blocks.type]
    rows, cols = blocks.shape
    raw = torch.from_numpy(blocks.data).view(rows, cols // 32, block_bytes)

    def half(offset: int) -> torch.Tensor:  # a float16 field of every block, [rows, blocks]
        return raw[..., offset:offset + 2].contiguous().view(torch.float16)[..., 0].float()

    d = half(0)
    zero = half(2) + 8 * d if blocks.type == GGMLQuantizationType.Q4_1 else torch.zeros_like(d)
    qs = raw[..., header:]  # [rows, blocks, 16]: code j in the low nibble of byte j, code j + 16 in the high one
    codes = torch.cat((qs & 15, qs >> 4), dim=-1).reshape(rows, cols)
    return {"qweight": pack_nibbles(codes), "scales": d.to(torch.bfloat16), "zeros": zero.to(torch.bfloat16)}
