"""GGUF block formats into quantized layers: Q4_0/Q4_1 and Q8_0 as they are (the "gguf" quantization, the
default for such files on CPU), or requantized into another format."""

import gguf
import numpy as np
import pytest
import torch

from keel import LLM, SamplingParams
from keel.models.gguf import GGUFBlocks, read_gguf
from keel.quant import QuantConfig
from keel.quant.gguf_blocks import gguf_to_int4, gguf_to_int8
from tests.quant.conftest import write_gguf
from tests.quant.test_layers import _elementwise_bound

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
    assert q["scales"].dtype == torch.float16  # as compact as the file (zeros exact in float16 here)
    assert torch.equal(got, want)  # the file's weights, exactly: no rounding of scales or zeros


def test_q4_1_zero_not_exact_in_float16_is_kept_in_float32():
    """m + 8 d needs more bits than float16 has when m and d differ much in size: float32 keeps it exact."""
    w = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32) * 1e-3 + 1.0  # min >> step
    blocks = gguf.quants.quantize(w, Q.Q4_1)
    q = gguf_to_int4(GGUFBlocks(Q.Q4_1, (4, 64), blocks))
    from keel.quant.int4 import dequantize_int4, unpack_nibbles
    want = torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q4_1))
    assert q["zeros"].dtype in (torch.float16, torch.float32)
    assert torch.equal(dequantize_int4(unpack_nibbles(q["qweight"]), q["scales"], q["zeros"]), want)


def test_q8_0_blocks_become_int8_groups_of_32():
    w = np.random.default_rng(0).standard_normal((40, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(w, Q.Q8_0)
    q = gguf_to_int8(GGUFBlocks(Q.Q8_0, (40, 96), blocks))
    assert q["qweight"].dtype == torch.int8 and q["scales"].shape == (40, 3) and q["scales"].dtype == torch.float16
    got = (q["qweight"].view(40, 3, 32).float() * q["scales"].float()[..., None]).view(40, 96)
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q8_0)))


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


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_0])
def test_gguf_file_is_served_in_its_own_formats_by_default(tmp_path, qtype):
    """A GGUF file with Q4 projections and a Q8_0 embedding, loaded with no quantization named: the
    projections become int4 and the embedding (and the tied head) int8, groups of 32, holding the file's
    weights exactly; the model computes what the dequantized model computes."""
    from keel.kernels.cpu import kernels
    from keel.quant.int8 import Int8Embedding
    from keel.quant.layer import TiedQuantHead
    path = tmp_path / "m.gguf"
    write_gguf(path, qtype, embedding_type=Q.Q8_0)
    floats = dict(read_gguf(str(path)).tensors())
    llm = LLM(str(path), max_model_len=64, num_blocks=16, dtype="float32")
    if kernels() is None:  # elsewhere the default stays dequantized
        assert llm.engine.quantization is None
        pytest.skip("keel's CPU kernels do not run here")
    assert llm.engine.quantization.method == "gguf"
    model = llm.engine.model
    for name, (layer, rows) in _shards(model).items():
        assert type(layer).__name__ == "Int4Linear" and layer.group_size == 32
        assert torch.equal(layer.dequantize(torch.float32)[rows], floats[name]), name
    emb = model.model.embed_tokens
    assert isinstance(emb, Int8Embedding) and isinstance(model.lm_head, TiedQuantHead)
    assert torch.equal(emb.dequantize(torch.float32), floats["model.embed_tokens.weight"])
    assert llm.engine.weight_bytes()["embedding"] < 0.3 * floats["model.embed_tokens.weight"].numel() * 4

    dense = LLM(str(path), max_model_len=64, num_blocks=16, dtype="float32", quantization="none")
    assert dense.engine.quantization is None and type(dense.engine.model.model.embed_tokens).__name__ == "Embedding"
    prompts = [[5, 6, 7], [9, 30, 31, 32, 33, 34, 35], [70]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    ours, ref = llm.generate(prompts, params), dense.generate(prompts, params)
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(la.logprob - lb.logprob) < 1e-4
            theirs = {t: x for t, _, x in lb.top}
            assert all(abs(x - theirs[t]) < 1e-4 for t, _, x in la.top if t in theirs)


def test_gguf_quantization_needs_a_gguf_file(hf_checkpoint):
    from keel.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        LLM(hf_checkpoint(), quantization="gguf", max_model_len=64, num_blocks=8)
