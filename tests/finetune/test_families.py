"""LoRA training on the other families: the trainer's forward (packed sequences, no cache, the families'
own attention scores) equals transformers' logits, and its adapter gradients equal PEFT's."""

from __future__ import annotations

import pytest
import torch

from keel.finetune.lora import attach, save_peft
from keel.finetune.trainer import hidden_states, load_base
from tests.models import family
from tests.models import test_falcon, test_gemma, test_mixtral, test_mpt
from tests.models.conftest import BASE

CASES = {  # name -> (config class, model class, config, LoRA targets)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**BASE, "pad_token_id": 0, "sliding_window": 8}, ["all-linear"]),
    "gemma2": (*test_gemma.CASES["gemma2-softcap"][:2], {**test_gemma.SMALL, **test_gemma.CASES["gemma2-softcap"][2]},
               "all-linear"),
    "gemma3": (*test_gemma.CASES["gemma3-local"][:2], {**test_gemma.SMALL, **test_gemma.CASES["gemma3-local"][2]},
               "all-linear"),
    "falcon-rw": ("FalconConfig", "FalconForCausalLM", {**test_falcon.SMALL, **test_falcon.CASES["falcon-rw"]},
                  ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "mpt": ("MptConfig", "MptForCausalLM", {**test_mpt.SMALL, **test_mpt.CASES["mpt-6heads-clip"]},
            ["Wqkv", "out_proj", "up_proj", "down_proj"]),
    # through the mixture-of-experts layers, adapters on attention (the experts take none)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**BASE, "pad_token_id": 0, **test_mixtral.CASES["mixtral-8x2-gqa"]},
                test_mixtral.ATTENTION),
}
RANDOMIZE = {"mixtral": test_mixtral.randomize_router}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_forward_and_gradients_match_peft(case, tmp_path):
    from peft import PeftModel
    cfg_name, model_name, config, targets = CASES[case]
    folder = str(tmp_path / "base")
    hf = family.build(folder, cfg_name, model_name, config, seed=5, randomize=RANDOMIZE.get(case))
    model, _ = load_base(folder, 256, torch.device("cpu"), torch.float32)
    layers = attach(model, 4, 8.0, 0.0, targets, seed=0)
    with torch.no_grad():  # B starts at zero: give it values so that the update shows
        g = torch.Generator().manual_seed(1)
        for layer in layers:
            for b in layer.B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    # two sequences packed for keel, longer than the sliding windows; one at a time through PEFT
    seqs = [torch.randint(2, 250, (n,), generator=torch.Generator().manual_seed(n)) for n in (19, 11)]
    logits = model.compute_logits(hidden_states(model, torch.cat(seqs), [19, 11]))
    adapter = str(tmp_path / "adapter")
    save_peft(layers, adapter, 4, 8.0, 0.0, targets, folder)
    peft_model = PeftModel.from_pretrained(hf, adapter, is_trainable=True)
    want = torch.cat([peft_model(input_ids=s[None]).logits[0] for s in seqs]).float()
    span = (want.max() - want.min()).item()
    assert (logits - want).abs().max() <= 1e-4 * span, case

    logits.logsumexp(-1).sum().backward()
    want.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    checked = 0
    for layer in layers:
        for k, i in enumerate(layer.order):
            for ab, param in (("A", layer.A[k]), ("B", layer.B[k])):
                ref = grads[f"base_model.model.{layer.names[i]}.lora_{ab}.default.weight"]
                assert torch.allclose(param.grad, ref, atol=1e-4, rtol=1e-3), (case, layer.names[i], ab)
                checked += 1
    assert checked == len(grads) > 0
