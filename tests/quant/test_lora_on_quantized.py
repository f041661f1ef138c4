"""LoRA adapters on a quantized base: they add on top in full precision, so keel with a quantized model
and a PEFT adapter must match PEFT on the dequantized weights."""

import pytest
import torch

from keel import LLM, SamplingParams
from keel.lora import LoRARequest
from keel.quant.layer import QuantLinear
from tests.lora.conftest import ADAPTERS, hf_greedy, make_peft_adapter
from tests.lora.test_parity import keel_lora_logits
from tests.models.conftest import make_checkpoint

PROMPTS = [[5, 6, 7], list(range(10, 27))]
NAMES = ["qv-r4", "all-r8-rslora"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    hf = make_checkpoint(str(root / "base"), "llama-gqa")
    adapters = {n: str(root / n) for n in NAMES}
    for i, n in enumerate(NAMES):
        make_peft_adapter(hf, adapters[n], seed=7 + i, **ADAPTERS[n])
    return str(root / "base"), hf, adapters


def _dequantized_hf(hf, model):
    """A copy of the transformers model holding keel's dequantized projection weights."""
    import copy
    ref = copy.deepcopy(hf)
    for i, layer in enumerate(model.model.layers):
        hl = ref.model.layers[i]
        for fused, parts in ((layer.self_attn.qkv_proj, {"q": hl.self_attn.q_proj, "k": hl.self_attn.k_proj,
                                                         "v": hl.self_attn.v_proj}),
                             (layer.mlp.gate_up_proj, {"gate": hl.mlp.gate_proj, "up": hl.mlp.up_proj}),
                             (layer.self_attn.o_proj, {None: hl.self_attn.o_proj}),
                             (layer.mlp.down_proj, {None: hl.mlp.down_proj})):
            w = fused.dequantize(torch.float32)
            for shard, lin in parts.items():
                with torch.no_grad():
                    lin.weight.copy_(w[fused.shard_slice(shard)])
    return ref.eval()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_peft_adapters_on_a_quantized_base_match_peft_on_dequantized_weights(base, method):
    from peft import PeftModel
    folder, hf, adapters = base
    llm = LLM(folder, dtype="float32", quantization=method, num_blocks=64, block_size=4, enable_lora=True,
              max_loras=len(NAMES))
    for n, path in adapters.items():
        llm.add_lora(n, path)
    model = llm.engine.model
    ref_base = _dequantized_hf(hf, model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.lora is not None for m in layers)

    # Through the kernels (bfloat16 activations): logits within a few bf16 roundings of PEFT's.
    names = [None] + NAMES
    prompts = [PROMPTS[i % 2] for i in range(len(names))]
    peft = {n: PeftModel.from_pretrained(_dequantized_hf(hf, model), adapters[n]).eval() for n in NAMES}
    for name, prompt, ours in zip(names, prompts, keel_lora_logits(llm, prompts, names)):
        with torch.no_grad():
            ref = (ref_base if name is None else peft[name])(torch.tensor([prompt])).logits[0]
        span = (ref.max() - ref.min()).item()
        assert (ours - ref).abs().max().item() <= 0.03 * span, (method, name)

    # Through dequantize-then-matmul in float32: the same greedy tokens as PEFT.
    for m in layers:
        m.fast_max_rows = 0
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for n in NAMES:
        outs = llm.generate(PROMPTS, greedy, lora_request=LoRARequest(n))
        for prompt, out in zip(PROMPTS, outs):
            assert out.outputs[0].token_ids == hf_greedy(peft[n], prompt, 16), (method, n)
