"""Each model family against transformers on tiny random checkpoints: logits close, greedy tokens equal."""

from __future__ import annotations

import json
import os

import pytest

from keel import LLM, SamplingParams
from tests.models.conftest import CASES, make_checkpoint
from tests.models.family import PROMPTS, backends, check_logits_and_greedy, engine, hf_greedy


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_matches_transformers(case, backend, checkpoints):
    folder, hf = checkpoints(case)
    check_logits_and_greedy(engine(folder, backend, num_blocks=64), hf, case)


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
