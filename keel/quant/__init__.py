"""Weight-only quantization: int8 (per output channel) and int4 (per group), by swapping modules.

`QuantConfig` says what; `convert.quantize_model` swaps a model's Linear layers for Int8Linear or
Int4Linear before its weights load, and `convert.checkpoint_tensors` turns the checkpoint's weights
into their format as they stream in. `checkpoint.quantize_checkpoint` writes that format to disk
(`keel quantize`), and such a folder loads straight into the quantized layers.
"""

from keel.quant.config import DEFAULT_INT4_GROUP_SIZE, INT4_GROUP_SIZES, METHODS, QuantConfig, parse_quantization

__all__ = ["QuantConfig", "parse_quantization", "METHODS", "INT4_GROUP_SIZES", "DEFAULT_INT4_GROUP_SIZE"]
