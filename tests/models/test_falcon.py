"""Falcon (FalconForCausalLM) against transformers: Falcon-7B (multi-query, parallel attention, rotary),
the new decoder architecture of Falcon-40B/180B (grouped key/value heads, two LayerNorms) and Falcon-11B
(one), Falcon-RW (ALiBi, biases, attention then MLP); the config's older key names and the KV cache's
true head count; ALiBi slopes against BLOOM's and Falcon's; PEFT adapters on the fused query_key_value."""

from __future__ import annotations

import pytest
import torch

from keel.errors import UnsupportedModelError
from keel.layers.attention import alibi_slopes
from keel.models.config import ModelConfig
from tests.models import family

SMALL = dict(vocab_size=family.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=96,
             max_position_embeddings=256, bos_token_id=0, eos_token_id=1)

CASES = {
    "falcon-7b": {"multi_query": True, "parallel_attn": True, "bias": False},
    # two key/value groups of two query heads each; num_ln_in_parallel_attn unset: two norms (ln_attn, ln_mlp)
    "falcon-40b": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "falcon-11b": {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1},
    "falcon-rw": {"alibi": True, "bias": True, "parallel_attn": False, "multi_query": False},
    # six heads: ALiBi's slopes of four heads, then two from the power of two above
    "falcon-rw-6heads": {"alibi": True, "bias": True, "parallel_attn": False, "multi_query": False,
                         "hidden_size": 96, "num_attention_heads": 6},
}


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    made = {}

    def get(case: str):
        if case not in made:
            folder = str(tmp_path_factory.mktemp(case))
            made[case] = (folder, family.build(folder, "FalconConfig", "FalconForCausalLM", {**SMALL, **CASES[case]},
                                               seed=3))
        return made[case]
    return get


@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", ["falcon-7b", "falcon-40b", "falcon-rw"])
def test_falcon_matches_transformers(falcon, case, backend):
    folder, hf = falcon(case)
    family.check_logits_and_greedy(family.engine(folder, backend), hf, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", ["falcon-11b", "falcon-rw-6heads"])
def test_falcon_variants_match_transformers(falcon, case, backend):
    folder, hf = falcon(case)
    family.check_logits_and_greedy(family.engine(folder, backend), hf, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["falcon-7b", "falcon-40b", "falcon-rw"])
def test_falcon_batched_prefix_hits_and_chunks(falcon, case):
    folder, hf = falcon(case)
    family.check_engine_paths(folder, hf, case, family.backends()[0])


@pytest.mark.parametrize("case", ["falcon-7b", "falcon-rw"])
def test_falcon_peft_adapter_on_fused_qkv(falcon, tmp_path, case):
    folder, hf = falcon(case)
    family.check_peft(folder, hf, case, str(tmp_path / "adapter"), family.backends()[0], r=4, lora_alpha=8,
                      target_modules=["query_key_value", "dense"])


def test_falcon_lora_targets_carry_peft_names(falcon):
    """PEFT names the fused projection transformer.h.N.self_attention.query_key_value: so does keel, whole."""
    from keel.lora.adapter import BaseTargets
    folder, _ = falcon("falcon-40b")
    targets = BaseTargets(family.engine(folder).engine.model).targets
    qkv = targets["transformer.h.1.self_attention.query_key_value"]
    assert (qkv.shard, qkv.out_features) == (0, (4 + 2 * 2) * 16)
    assert {n.rsplit(".", 1)[1] for n in targets} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


@pytest.mark.parametrize("case, kv_heads", [("falcon-7b", 1), ("falcon-40b", 2), ("falcon-rw", 4)])
def test_falcon_kv_cache_holds_the_true_kv_heads(falcon, case, kv_heads):
    """transformers writes num_kv_heads = num_attention_heads into a multi-query config: the cache and the
    engine's memory sums hold one key/value head there, not four."""
    from keel.engine.model_runner import ModelRunner
    folder, _ = falcon(case)
    eng = family.engine(folder).engine
    assert eng.model_config.num_kv_heads == kv_heads
    assert all(a.k_cache.shape[1:] == (kv_heads, 16) for a in eng.model.attention_layers())
    per_token = 2 * SMALL["num_hidden_layers"] * kv_heads * 16 * torch.float32.itemsize
    assert ModelRunner.kv_bytes_per_token(eng.model_config, torch.float32) == per_token


def test_falcon_config_older_names():
    """The RW checkpoints' names: n_embed, n_head, n_layer, n_head_kv; FalconConfig's defaults elsewhere."""
    raw = {"architectures": ["FalconForCausalLM"], "vocab_size": 256, "n_embed": 64, "n_head": 4, "n_layer": 3,
           "n_head_kv": 2, "new_decoder_architecture": True, "layer_norm_epsilon": 1e-3}
    cfg = ModelConfig.from_hf(raw)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (64, 4, 3, 2, 16)
    assert (cfg.intermediate_size, cfg.rms_norm_eps, cfg.hidden_act) == (256, 1e-3, "gelu")
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 2048 and cfg.eos_token_ids == [11]
    assert cfg.extra["parallel_attn"] and cfg.extra["num_ln_in_parallel_attn"] == 2


def test_falcon_refuses_what_it_does_not_implement():
    raw = {"architectures": ["FalconForCausalLM"], "vocab_size": 256, "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "apply_residual_connection_post_layernorm": True}
    with pytest.raises(UnsupportedModelError, match="apply_residual_connection_post_layernorm"):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize("heads", [4, 6, 8, 12])
def test_alibi_slopes_match_bloom_and_falcon(heads):
    """keel.layers.attention.alibi_slopes against transformers' build_alibi_tensor (slope * key position:
    position 1 holds the slope): BLOOM's in float32, Falcon's rounded to bfloat16, which keel's Falcon
    reproduces (and scales by 1/sqrt(head_dim), see keel.models.falcon.falcon_alibi)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor as bloom_alibi
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi_tensor

    from keel.models.falcon import falcon_alibi
    mask = torch.ones(1, 3, dtype=torch.long)
    bloom = bloom_alibi(mask, heads, torch.float32)[:, 0, 1]
    falcon = falcon_alibi_tensor(mask, heads, torch.float32)[:, 0, 1]
    ours = torch.tensor(alibi_slopes(heads), dtype=torch.float64)
    assert torch.allclose(ours, bloom.double(), rtol=1e-6, atol=0)
    assert torch.equal(ours.float().bfloat16().float(), falcon)
    head_dim = 16
    assert torch.allclose(torch.tensor(falcon_alibi(heads, head_dim)), falcon * head_dim ** -0.5, rtol=1e-6, atol=0)
    if heads == 12:  # slopes 2^-0.5, 2^-1.5 ...: bfloat16 rounds them, so the rounding matters
        assert not torch.equal(bloom, falcon)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_falcon_quantized_with_its_embedding(falcon, method):
    """int8/int4 with the embedding and tied head quantized too: found under transformer.word_embeddings,
    and the logits stay near float32's (a tiny random model: within a tenth of their range)."""
    from keel.quant.config import QuantConfig
    from keel.quant.layer import QuantLinear
    folder, hf = falcon("falcon-7b")
    llm = family.engine(folder, family.backends()[0], quantization=QuantConfig(method, quantize_embeddings=True))
    model = llm.engine.model
    assert not isinstance(model.transformer.word_embeddings, torch.nn.Embedding)
    assert isinstance(model.transformer.h[0].self_attention.query_key_value, QuantLinear)
    ours = family.keel_logits(llm, family.PROMPTS[2:])[0]
    ref = family.hf_logits(hf, family.PROMPTS[2])
    assert (ours - ref).abs().max() <= 0.1 * (ref.max() - ref.min())
