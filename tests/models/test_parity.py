"""Each model family against transformers on tiny random checkpoints: logits close, greedy tokens equal."""

from __future__ import annotations

import json
import os

import pytest
import torch

from keel import LLM, SamplingParams
from keel.layers.attention import AttentionMetadata
from tests.models.conftest import CASES, make_checkpoint

PROMPTS = [[5, 6, 7], list(range(10, 27)), [(i * 7) % 250 + 2 for i in range(41)]]


def keel_logits(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts prefilled together in one forward pass; logits of every position of each."""
    eng = llm.engine
    bs = eng.cache_config.block_size
    tables = [eng.pool.allocate(-(-len(p) // bs)) for p in prompts]
    try:
        meta = AttentionMetadata.build([len(p) for p in prompts], [len(p) for p in prompts], tables, bs, eng.device)
        ids = torch.tensor([t for p in prompts for t in p])
        pos = torch.tensor([i for p in prompts for i in range(len(p))])
        with torch.inference_mode():
            logits = eng.model.compute_logits(eng.model(ids, pos, meta))
    finally:
        for t in tables:
            eng.pool.free(t)
    return list(logits.split([len(p) for p in prompts]))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _backends() -> list[str]:
    """Every code path this machine can run, whatever it would pick: each build of keel's CPU kernels,
    and PyTorch's operators."""
    from keel.kernels.cpu import kernels, runnable_isas
    return [f"keel-{isa}" for isa in runnable_isas() if kernels(isa) is not None] + ["torch"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_matches_transformers(case, backend, checkpoints):
    folder, hf = checkpoints(case)
    kernels, _, isa = backend.partition("-")
    llm = LLM(folder, dtype="float32", num_blocks=64, block_size=4, kernels=kernels, cpu_isa=isa or None)
    assert llm.engine.backend.isa == (isa or None)
    for prompt, ours in zip(PROMPTS, keel_logits(llm, PROMPTS)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        span = (ref.max() - ref.min()).item()
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4 * span, f"{case}: max |logit diff| {diff:.3g} over range {span:.3g}"

    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24), case


def test_sharded_checkpoint_and_legacy_rope_keys(tmp_path):
    folder = str(tmp_path / "sharded")
    hf = make_checkpoint(folder, "llama3-rope", seed=3, shard_size="60KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    # Rewrite the config with the older top-level keys (rope_theta, rope_scaling).
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    json.dump(cfg, open(path, "w"))
    llm = LLM(folder, dtype="float32", num_blocks=64, block_size=4)
    assert llm.engine.model_config.rope_scaling["rope_type"] == "llama3"
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[2], 24)
