"""Adapters made with the real `peft` library on the tiny checkpoints of tests/models, with random
non-zero lora_B (PEFT starts B at zero, which would make every adapter a no-op)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from tests.models.conftest import make_checkpoint

# name -> LoraConfig arguments: several ranks and target sets, per-module ranks and alphas, rsLoRA.
# Scales stay moderate: with random A and B at 0.3, rsLoRA at alpha 16 (scale 5.7) swamped the tiny models'
# weights and made their logits chaotic, float32 rounding order alone moving them ~1e-4 of their range.
ADAPTERS = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8-rslora": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True,
                          rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 4}),
    "all-r16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"],
                    rank_pattern={"layers.1.self_attn.k_proj": 2}),
    "mlp-r8-layer1": dict(r=8, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"],
                          layers_to_transform=[1]),
}


def randomize_lora(model, seed: int, scale: float = 0.3, bf16_exact: bool = True) -> None:
    """bf16_exact: values a bfloat16 holds exactly, like an adapter trained and saved in bfloat16, so keel's
    default bfloat16 adapter stacks under a float32 model (LoRAConfig.lora_dtype) hold them unchanged and
    greedy tokens can be compared with PEFT's exactly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                v = torch.randn(p.shape, generator=g) * scale
                p.copy_(v.bfloat16().float() if bf16_exact else v)


def make_peft_adapter(hf_model, folder: str, seed: int, bf16_exact: bool = True, **lora_kwargs):
    """Save a PEFT LoRA adapter for (a copy of) hf_model into folder; returns the PEFT model (eval)."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(**lora_kwargs))
    randomize_lora(peft_model, seed, bf16_exact=bf16_exact)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every LoRA test module runs on one thread (tests/conftest.py says why)."""
    yield


@pytest.fixture(scope="session")
def lora_case(tmp_path_factory):
    """case -> (checkpoint folder, transformers model, {adapter name: (folder, PEFT model)}), built once."""
    root = tmp_path_factory.mktemp("lora")
    made = {}

    def get(case: str):
        if case not in made:
            ckpt = str(root / case)
            hf = make_checkpoint(ckpt, case)
            adapters = {}
            for i, (name, kw) in enumerate(ADAPTERS.items()):
                folder = str(root / f"{case}-{name}")
                adapters[name] = (folder, make_peft_adapter(hf, folder, seed=100 + i, **kw))
            made[case] = (ckpt, hf, adapters)
        return made[case]
    return get


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
