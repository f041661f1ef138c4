"""Phi-3 / Phi-3.5 / Phi-4 (Phi3ForCausalLM) against transformers: fused qkv and gate_up projections,
LongRoPE (short and long factors), partial rotary, a sliding window, and PEFT adapters on the fused modules."""

from __future__ import annotations

import pytest

from tests.models import family
from tests.models.conftest import BASE

HEAD = BASE["hidden_size"] // BASE["num_attention_heads"]  # 16: 8 frequencies


def _longrope(trained: int, rotary: int = HEAD) -> dict:
    n = rotary // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": trained,
            "short_factor": [1.0 + 0.25 * i for i in range(n)], "long_factor": [2.0 + 1.5 * i for i in range(n)]}


CASES = {
    "phi3": {},
    # Phi-3.5 / Phi-4-mini: LongRoPE; the engine's context (64) beyond the pretraining length (16): long factors
    "phi3-longrope-long": {"max_position_embeddings": 64, "original_max_position_embeddings": 16,
                           "rope_parameters": _longrope(16)},
    # ... and within it: short factors (attention factor from 256 / 64)
    "phi3-longrope-short": {"max_position_embeddings": 256, "original_max_position_embeddings": 64,
                            "rope_parameters": _longrope(64)},
    # Phi-4-mini rotates three quarters of each head
    "phi3-partial": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
    # Phi-3-mini-4k has a sliding window: 8 here, so the harness's prompts (up to 41 tokens) cross it
    "phi3-window": {"sliding_window": 8},
}


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    made = {}

    def get(case: str):
        if case not in made:
            folder = str(tmp_path_factory.mktemp(case))
            config = {**BASE, "pad_token_id": 0, **CASES[case]}
            made[case] = (folder, family.build(folder, "Phi3Config", "Phi3ForCausalLM", config, seed=1))
        return made[case]
    return get


def _engine(folder: str, case: str, backend: str):
    # keel picks LongRoPE's factor set by the context it serves: long past the pretraining length (where
    # transformers agrees on prompts past it), short within it (where it agrees on every prompt).
    max_model_len = {"phi3-longrope-long": 64, "phi3-longrope-short": 64}.get(case)
    return family.engine(folder, backend, max_model_len=max_model_len)


@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", ["phi3", "phi3-partial"])
def test_phi3_matches_transformers(phi3, case, backend):
    folder, hf = phi3(case)
    family.check_logits_and_greedy(_engine(folder, case, backend), hf, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", ["phi3-longrope-long", "phi3-longrope-short", "phi3-window"])
def test_phi3_variants_match_transformers(phi3, case, backend):
    folder, hf = phi3(case)
    # transformers picks LongRoPE's long factors only for sequences past the pretraining length: compare those
    prompts = [p for p in family.PROMPTS if len(p) > 16] if case == "phi3-longrope-long" else family.PROMPTS
    family.check_logits_and_greedy(_engine(folder, case, backend), hf, case, prompts=prompts, tokens=16)


def test_longrope_factor_set_follows_the_served_context(phi3):
    """An engine that serves past the pretraining length rotates with the long factors, one within it
    with the short ones: the cos tables differ."""
    folder, _ = phi3("phi3-longrope-long")
    long = family.engine(folder, max_model_len=64).engine.model.rotary.cos
    short = family.engine(folder, max_model_len=16).engine.model.rotary.cos
    assert not long[:16].allclose(short[:16])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["phi3", "phi3-window"])
def test_phi3_batched_prefix_hits_and_chunks(phi3, case):
    folder, hf = phi3(case)
    family.check_engine_paths(folder, hf, case, family.backends()[0])


def test_phi3_window_is_applied_not_capped(phi3):
    """The window shapes attention instead of capping the context at the window (as Mistral's does)."""
    folder, _ = phi3("phi3-window")
    llm = family.engine(folder)
    assert llm.engine.max_model_len > 8
    assert all(a.scores.window == 8 for a in llm.engine.model.attention_layers())


@pytest.mark.parametrize("target", [["qkv_proj", "gate_up_proj"], "all-linear"])
def test_phi3_peft_adapter_on_fused_modules(phi3, tmp_path, target):
    folder, hf = phi3("phi3")
    family.check_peft(folder, hf, f"phi3 {target}", str(tmp_path / "adapter"), family.backends()[0],
                      r=4, lora_alpha=8, target_modules=target)
