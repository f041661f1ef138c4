"""GGUF block formats into quantized layers: Q4_0/Q4_1 as they are, Q8_0 (and any other) requantized."""

import gguf
import numpy as np
import pytest
import torch

from keel import LLM
from keel.models.gguf import GGUFBlocks, read_gguf
from keel.quant import QuantConfig
from keel.quant.gguf_blocks import gguf_to_int4
from tests.quant.conftest import write_gguf
from tests.quant.test_layers import BF16_ROUNDING, _elementwise_bound

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_blocks_become_int4_groups_of_32(qtype):
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(w, qtype)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    q = gguf_to_int4(GGUFBlocks(qtype, (48, 96), blocks))
    assert q["qweight"].shape == (48, 48) and q["scales"].shape == (48, 3)
    from keel.quant.int4 import dequantize_int4, unpack_nibbles
    got = dequantize_int4(unpack_nibbles(q["qweight"]), q["scales"], q["zeros"])
    s, z = q["scales"].float().abs(), q["zeros"].float()  # Q4_0's d may be negative
    # the codes are GGUF's own: only the bf16 rounding of scale and zero moves a weight
    bound = (BF16_ROUNDING * (8 * s + z.abs()) + 1e-7).repeat_interleave(32, dim=1)
    assert ((got - want).abs() <= bound).all()
    assert (bound < s.repeat_interleave(32, dim=1) / 8).all()  # far below the quantization step


def _shards(model):
    """HF projection name -> (quantized layer, rows of it)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for fused, names in ((layer.self_attn.qkv_proj, {"q": "q_proj", "k": "k_proj", "v": "v_proj"}),
                             (layer.mlp.gate_up_proj, {"gate": "gate_proj", "up": "up_proj"})):
            for shard, name in names.items():
                sub = "self_attn" if name[0] in "qkv" else "mlp"
                out[f"model.layers.{i}.{sub}.{name}.weight"] = (fused, fused.shard_slice(shard))
        out[f"model.layers.{i}.self_attn.o_proj.weight"] = (layer.self_attn.o_proj, slice(None))
        out[f"model.layers.{i}.mlp.down_proj.weight"] = (layer.mlp.down_proj, slice(None))
    return out


@pytest.mark.parametrize("qtype, quant", [
    (Q.Q4_1, "int4"),  # straight in
    (Q.Q4_0, "int4"),
    (Q.Q4_1, QuantConfig("int4", 64)),  # another group size: requantized from the dequantized blocks
    (Q.Q8_0, "int8"),  # requantized per channel
    (Q.Q4_1, "int8"),
])
def test_gguf_file_loads_into_quantized_layers(tmp_path, qtype, quant):
    path = tmp_path / "m.gguf"
    write_gguf(path, qtype)
    floats = dict(read_gguf(str(path)).tensors())  # keel's float reading: HF names, q/k un-permuted
    llm = LLM(str(path), quantization=quant, max_model_len=64, num_blocks=8)
    cfg = llm.engine.quantization
    direct = cfg.method == "int4" and cfg.group_size == 32
    for name, (layer, rows) in _shards(llm.engine.model).items():
        assert type(layer).__name__ == ("Int8Linear" if cfg.method == "int8" else "Int4Linear")
        want = floats[name]
        got = layer.dequantize(torch.float32)[rows]
        if direct:
            steps = layer._state()[1].float()[rows].abs()
            assert (got - want).abs().max() < steps.min() / 8, name  # no requantization happened
        else:
            q = layer.quantize(want, cfg.group_size)
            assert ((got - want).abs() <= _elementwise_bound(cfg.method, q, cfg.group_size)).all(), name
    out = llm.generate([[5, 6, 7]], None)[0].outputs[0]
    assert len(out.token_ids) > 0
