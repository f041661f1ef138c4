"""A thousand adapters registered from a folder on a tiny model, requests over two hundred of them
through 8 resident slots: outputs right, residency within the budget at every step, host memory bounded."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from keel import LLM, SamplingParams
from tests.lora.conftest import hf_greedy

NUM_ADAPTERS, NUM_USED, MAX_LORAS, MAX_CPU = 1000, 200, 8, 16
TEMPLATES = ["qv-r4", "all-r8-rslora", "mlp-r8-layer1"]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def prompt_for(i: int) -> list[int]:
    return [(i * 11 + k * 7) % 250 + 2 for k in range(3 + i % 9)]


@pytest.fixture(scope="module")
def many(lora_case, tmp_path_factory):
    """1000 adapter folders written straight from three PEFT-made templates, each with its own random B."""
    ckpt, hf, adapters = lora_case("llama-gqa")
    root = tmp_path_factory.mktemp("many")
    templates = []
    for name in TEMPLATES:
        folder = adapters[name][0]
        templates.append((open(os.path.join(folder, "adapter_config.json")).read(),
                          load_file(os.path.join(folder, "adapter_model.safetensors"))))
    g = torch.Generator().manual_seed(0)
    for i in range(NUM_ADAPTERS):
        cfg, tensors = templates[i % len(templates)]
        folder = root / f"ad{i:04d}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(cfg)
        # B saved in bfloat16, as adapters trained in bfloat16 are (A stays the template's float32)
        save_file({k: (torch.randn(v.shape, generator=g) * 0.3).bfloat16() if "lora_B" in k else v
                   for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"))
    (root / "not-an-adapter").mkdir()
    return ckpt, hf, str(root)


def test_thousand_registered_two_hundred_used_eight_resident(many):
    ckpt, hf, root = many
    llm = LLM(ckpt, dtype="float32", num_blocks=512, block_size=4, max_num_seqs=32, enable_lora=True,
              max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU)
    eng = llm.engine
    names = eng.adapters.register_dir(root)
    assert len(names) == NUM_ADAPTERS and eng.lora.num_in_host == 0  # registered, nothing read
    mgr = eng.lora
    seen = {"steps": 0, "max_resident": 0, "max_host": 0, "max_active": 0}
    orig = mgr.prepare_step

    def checked_prepare(active, in_use):
        plan = orig(active, in_use)
        assert len(in_use) <= MAX_LORAS and mgr.num_resident <= MAX_LORAS
        assert mgr.num_in_host <= MAX_CPU
        seen["steps"] += 1
        seen["max_active"] = max(seen["max_active"], len(active))
        seen["max_resident"] = max(seen["max_resident"], mgr.num_resident)
        seen["max_host"] = max(seen["max_host"], mgr.num_in_host)
        return plan
    mgr.prepare_step = checked_prepare

    used = [f"ad{i:04d}" for i in range(0, NUM_ADAPTERS, NUM_ADAPTERS // NUM_USED)][:NUM_USED]
    jobs = [(n, i) for i, n in enumerate(used)] + [(used[i], 1000 + i) for i in range(0, NUM_USED, 7)]
    jobs += [(None, 2000 + i) for i in range(10)]
    outs = llm.generate([prompt_for(i) for _, i in jobs], PARAMS,
                        lora_request=[None if n is None else _req(n) for n, _ in jobs])
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert seen["max_active"] == MAX_LORAS and seen["max_resident"] <= MAX_LORAS
    assert seen["max_host"] <= MAX_CPU and mgr.peak_host <= MAX_CPU
    assert mgr.num_slot_loads >= NUM_USED and mgr.num_disk_loads >= NUM_USED

    # Spot-check against PEFT: adapters of every template, early and late in the queue.
    from peft import PeftModel
    got = {(n, i): o.outputs[0].token_ids for (n, i), o in zip(jobs, outs)}
    base = copy.deepcopy(hf)
    for n, i in jobs[:4] + jobs[100:103] + jobs[NUM_USED - 3:NUM_USED + 3]:
        if n is None:
            assert got[(n, i)] == hf_greedy(hf, prompt_for(i), 6)
            continue
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(root, n)).eval()
        assert got[(n, i)] == hf_greedy(peft_model, prompt_for(i), 6), (n, i)

    # Everything released: no request holds an adapter, the cache is whole again.
    assert eng.pool.num_free == eng.num_blocks
    assert all(e.refs == 0 for e in mgr._by_id.values())


def _req(name):
    from keel.lora import LoRARequest
    return LoRARequest(name)
