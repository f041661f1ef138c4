"""GGUF's 4-bit block formats straight into int4 groups of 32, without a detour through floats.

Q4_0 blocks are a float16 scale d and 32 codes, w = d * (code - 8); Q4_1 blocks a scale d, a minimum m
and 32 codes, w = d * code + m. Both are int4 with groups of 32 as keel holds it, w = (code - 8) * scale
+ zero: scale = d, zero = 0 (Q4_0) or m + 8 d (Q4_1), kept in float16 where every zero is exact in it
and in float32 otherwise (d and m + 8 d are: two float16 values of exponents less than 13 apart sum
exactly in float32's 24 bits), so keel's float32 kernel computes with the file's weights exactly. A
bfloat16 model's kernels round them to bfloat16 (at most 8 d / 256 + |zero| / 256 per weight).

Q8_0 blocks are a float16 scale d and 32 int8 codes, w = d * code: int8 with groups of 32 and float16
scales, exactly (gguf_to_int8), for layers built with that group size (the "gguf" quantization, which
keeps a GGUF file's formats; keel's CPU kernel computes with them). For the per-channel int8 of
`quantization="int8"` they are dequantized and requantized per channel, at most half a per-channel
step of extra rounding.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from keel.models.gguf import GGUFBlocks
from keel.quant.int4 import pack_nibbles

# (bytes per block of 32, bytes before the codes)
_LAYOUT = {GGMLQuantizationType.Q4_0: (18, 2), GGMLQuantizationType.Q4_1: (20, 4)}
INT4_TYPES = tuple(_LAYOUT)
INT8_TYPES = (GGMLQuantizationType.Q8_0,)
DIRECT_TYPES = INT4_TYPES + INT8_TYPES
GROUP = 32  # weights per block in all of them


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
    if torch.equal(zero.half().float(), zero):  # as compact as the file: 5 bits a weight
        d, zero = d.half(), zero.half()
    return {"qweight": pack_nibbles(codes), "scales": d, "zeros": zero}


def gguf_to_int8(blocks: GGUFBlocks) -> dict[str, torch.Tensor]:
    """Q8_0 blocks [rows, in / 32 blocks of 34 bytes] -> {"qweight" int8 [rows, in], "scales" float16
    [rows, in / 32]}: int8 with groups of 32, the file's values exactly."""
    rows, cols = blocks.shape
    raw = torch.from_numpy(blocks.data).view(rows, cols // 32, 34)
    scales = raw[..., :2].contiguous().view(torch.float16)[..., 0]
    return {"qweight": raw[..., 2:].contiguous().view(torch.int8).reshape(rows, cols), "scales": scales}


def default_gguf_quantization(ckpt, device: torch.device, dtype: torch.dtype, backend=None):
    """A GGUF file's weights in Q4_0/Q4_1/Q8_0 blocks are served as they are (QuantConfig("gguf")) on a
    CPU where keel's kernels compute a float32 model with them: what llama.cpp and Ollama users expect,
    the file's weights exactly (scales and zeros kept in float16), a quarter to a sixth of the memory of
    dequantized float32, and faster decoding (bench/results/decode.md). Elsewhere (GPUs, bfloat16, no
    kernels) the blocks are dequantized at load. None: dequantize."""
    from keel.kernels.backend import default_backend
    from keel.quant.config import QuantConfig
    backend = backend or default_backend(device)
    if not ckpt.tensor_types or device.type != "cpu" or dtype != torch.float32 or backend.cpu_kernels() is None:
        return None
    if not any(t in DIRECT_TYPES for t in ckpt.tensor_types.values()):
        return None
    return QuantConfig("gguf")
