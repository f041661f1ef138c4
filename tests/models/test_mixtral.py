"""Mixtral (MixtralForCausalLM) against transformers: sparse MoE layers of 3, 4 and 8 experts with top-1
and top-2 routing, MHA and GQA; both checkpoint layouts (per expert, as on the hub; stacked, as
transformers 5 holds them); int8 and int4 experts; PEFT adapters on the attention projections (served and
trained), and adapters on the router or experts refused with the target named."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from keel import SamplingParams
from keel.errors import LoRAError
from keel.layers.moe import Router, SparseMoE
from keel.lora.adapter import BaseTargets
from keel.quant import QuantConfig
from keel.quant.layer import QuantLinear
from tests.models import family
from tests.models.conftest import BASE, write_tokenizer

# name -> MixtralConfig overrides
CASES = {
    "mixtral-4x2-mha": {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 4},
    "mixtral-8x2-gqa": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "mixtral-3x1": {"num_local_experts": 3, "num_experts_per_tok": 1},
}
FAST = "mixtral-4x2-mha"
# Router weights this many times the default scale: a random tiny router leaves experts near-tied, and keel's
# and transformers' matmuls (summing in different orders) may then pick different ones; wider logits make
# the top-k decisive while the softmax still gives the second expert a real share.
ROUTER_SCALE = 2.0
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def randomize_router(name: str, p: torch.Tensor) -> bool:
    if name.endswith("mlp.gate.weight"):
        p.copy_(ROUTER_SCALE * torch.randn_like(p) / p.shape[-1] ** 0.5)
        return True
    return False


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    made = {}

    def get(case: str):
        if case not in made:
            folder = str(tmp_path_factory.mktemp(case))
            config = {**BASE, "pad_token_id": 0, **CASES[case]}
            made[case] = (folder, family.build(folder, "MixtralConfig", "MixtralForCausalLM", config, seed=1,
                                               randomize=randomize_router))
        return made[case]
    return get


@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", [FAST, pytest.param("mixtral-8x2-gqa", marks=pytest.mark.slow),
                                  pytest.param("mixtral-3x1", marks=pytest.mark.slow)])
def test_mixtral_matches_transformers(mixtral, case, backend):
    folder, hf = mixtral(case)
    family.check_logits_and_greedy(family.engine(folder, backend), hf, case)


@pytest.mark.parametrize("case", [FAST, pytest.param("mixtral-8x2-gqa", marks=pytest.mark.slow),
                                  pytest.param("mixtral-3x1", marks=pytest.mark.slow)])
def test_mixtral_batched_prefix_hits_and_chunks(mixtral, case):
    folder, hf = mixtral(case)
    family.check_engine_paths(folder, hf, case, family.backends()[0])


@pytest.mark.parametrize("case", [FAST, pytest.param("mixtral-8x2-gqa", marks=pytest.mark.slow),
                                  pytest.param("mixtral-3x1", marks=pytest.mark.slow)])
def test_mixtral_peft_adapter_on_attention(mixtral, tmp_path, case):
    folder, hf = mixtral(case)
    family.check_peft(folder, hf, f"{case} attention", str(tmp_path / "adapter"), family.backends()[0],
                      r=4, lora_alpha=8, target_modules=ATTENTION)


def test_save_pretrained_writes_per_expert_tensors_and_the_stacked_layout_loads(mixtral, tmp_path):
    """transformers 5 holds a layer's experts stacked (mlp.experts.gate_up_proj) but save_pretrained writes
    the hub's per-expert names; a file with the stacked tensors (here the in-memory state dict, saved as
    is) loads into the same model."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    folder, hf = mixtral("mixtral-8x2-gqa")
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    moe = "model.layers.1.block_sparse_moe"
    assert {f"{moe}.gate.weight", f"{moe}.experts.7.w1.weight", f"{moe}.experts.7.w3.weight"} <= saved
    assert not any(".mlp." in k for k in saved)
    stacked = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj"} <= set(stacked)
    other = tmp_path / "stacked"
    other.mkdir()
    save_file(stacked, str(other / "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        (other / "config.json").write_text(f.read())
    write_tokenizer(str(other))
    family.check_logits_and_greedy(family.engine(str(other), family.backends()[0]), hf, "stacked layout")


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_router_and_experts_are_not_lora_targets(mixtral, quantization):
    folder, _ = mixtral(FAST)
    base = BaseTargets(family.engine(folder, quantization=quantization).engine.model)
    assert base.short_names == sorted(ATTENTION)
    assert "model.layers.0.block_sparse_moe.gate" in base.unsupported
    assert {f"model.layers.1.block_sparse_moe.experts.3.{w}" for w in ("w1", "w2", "w3")} <= set(base.unsupported)


def _write_adapter(folder, target_modules, modules: dict[str, tuple[int, int]], r: int = 4) -> str:
    """A PEFT-format adapter (as transformers 4 era PEFT wrote for Mixtral) adapting `modules`:
    name -> (in, out)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": target_modules}, f)
    tensors = {}
    for name, (fan_in, fan_out) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, fan_in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, r)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("target,module,shape", [
    (["w1"], "model.layers.0.block_sparse_moe.experts.0.w1", (64, 96)),
    (["w2"], "model.layers.0.block_sparse_moe.experts.2.w2", (96, 64)),
    (["gate"], "model.layers.1.block_sparse_moe.gate", (64, 4)),
    ("all-linear", "model.layers.1.block_sparse_moe.experts.1.w3", (64, 96)),
])
def test_lora_on_router_or_experts_is_refused_by_name(mixtral, tmp_path, target, module, shape):
    folder, _ = mixtral(FAST)
    adapter = _write_adapter(str(tmp_path / "a"), target, {module: shape})
    llm = family.engine(folder, enable_lora=True)
    with pytest.raises(LoRAError) as e:
        llm.add_lora("moe", adapter)
    named = repr(target[0]) if isinstance(target, list) else repr(module)
    assert f"target {named}" in str(e.value) and "mixture-of-experts" in str(e.value), str(e.value)


@pytest.mark.parametrize("targets", [["gate"], "all-linear"])
def test_peft_adapters_on_the_moe_block_are_refused(mixtral, tmp_path, targets):
    """PEFT on transformers 5 adapts the router and the stacked experts through target_parameters ("all-linear"
    included), which keel does not implement: refused, not silently half applied."""
    from tests.lora.conftest import make_peft_adapter
    folder, hf = mixtral(FAST)
    make_peft_adapter(hf, str(tmp_path / "a"), seed=0, r=4, lora_alpha=8, target_modules=targets)
    llm = family.engine(folder, enable_lora=True)
    with pytest.raises(LoRAError, match="target_parameters"):
        llm.add_lora("moe", str(tmp_path / "a"))



def _dequantized_reference(hf, model):
    """transformers' model computing with the weights keel's quantized layers hold (the router stays as it is)."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for ours, theirs in zip(model.model.layers, ref.model.layers):
            a, at = ours.self_attn, theirs.self_attn
            q, k, v = a.qkv_proj.dequantize(torch.float32).split([a.q_size, a.kv_size, a.kv_size])
            for dst, w in ((at.q_proj, q), (at.k_proj, k), (at.v_proj, v),
                           (at.o_proj, a.o_proj.dequantize(torch.float32))):
                dst.weight.copy_(w)
            for e, expert in enumerate(ours.block_sparse_moe.experts):
                theirs.mlp.experts.gate_up_proj[e].copy_(expert.gate_up_proj.dequantize(torch.float32))
                theirs.mlp.experts.down_proj[e].copy_(expert.down_proj.dequantize(torch.float32))
    return ref


# PyTorch's int8/int4 CPU operators take bfloat16 activations (keel/quant/int8.py): against the float32
# reference, logits then differ by bfloat16 rounding through the layers, not by keel's kernels' float32 order.
BF16_ACTIVATIONS_REL = 3e-2


@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_experts_compute_their_quantized_weights(mixtral, method, backend):
    """Every expert's projections are quantized, the router is not, and the model computes what transformers
    computes with the dequantized weights: exactly on keel's kernels, to bfloat16 rounding on PyTorch's."""
    folder, hf = mixtral(FAST)
    llm = family.engine(folder, backend, quantization=method)
    moe = llm.engine.model.model.layers[0].block_sparse_moe
    assert type(moe.gate) is Router
    assert all(isinstance(lin, QuantLinear) and lin.method == method
               for expert in moe.experts for lin in (expert.gate_up_proj, expert.down_proj))
    ref = _dequantized_reference(hf, llm.engine.model)
    if backend == "torch":
        for prompt, ours in zip(family.PROMPTS, family.keel_logits(llm, family.PROMPTS)):
            want = family.hf_logits(ref, prompt)
            assert (ours - want).abs().max() <= BF16_ACTIVATIONS_REL * (want.max() - want.min())
    else:
        family.check_logits_and_greedy(llm, ref, f"{method} {backend}", tokens=16)


# int8 against float32: the first tokens of every prompt agree on this model; further on, a tiny random
# model's chaotic logits let weight rounding flip a choice (as in dense models: tests/quant).
INT8_SAME_TOKENS = 4


def test_int8_mixtral_starts_like_float_and_keel_quantize_writes_the_same(mixtral, tmp_path):
    from keel.quant.checkpoint import quantize_checkpoint
    folder, _ = mixtral(FAST)
    params = SamplingParams(temperature=0, max_tokens=INT8_SAME_TOKENS, ignore_eos=True)
    dense = [o.outputs[0].token_ids for o in family.engine(folder).generate(family.PROMPTS, params)]
    int8 = [o.outputs[0].token_ids for o in family.engine(folder, quantization="int8").generate(family.PROMPTS, params)]
    assert int8 == dense
    out = str(tmp_path / "int8")
    quantize_checkpoint(folder, out, QuantConfig("int8"))
    saved = [o.outputs[0].token_ids for o in family.engine(out).generate(family.PROMPTS, params)]
    assert saved == int8


def test_one_moe_block_per_layer_and_no_dense_mlp(mixtral):
    folder, _ = mixtral("mixtral-3x1")
    model = family.engine(folder).engine.model
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert len(blocks) == BASE["num_hidden_layers"]
    assert all(len(b.experts) == 3 and b.top_k == 1 for b in blocks)
    assert model.decode_stack is False  # keel's one-call decode stack runs dense MLPs only
