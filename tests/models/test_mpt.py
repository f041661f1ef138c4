"""MPT (MptForCausalLM) against transformers: ALiBi with four and six heads, clip_qkv, softmax_scale,
and what transformers' port hard-codes while MosaicML's MPT (which keel follows) reads it from the config:
biases (no_bias: false), expansion_ratio, alibi_bias_max, learned positions instead of ALiBi; ALiBi slopes
against build_mpt_alibi_tensor; PEFT adapters on Wqkv and out_proj; refused settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keel.errors import UnsupportedModelError
from keel.layers.attention import alibi_slopes
from keel.models.config import ModelConfig
from tests.models import family

SMALL = dict(vocab_size=family.VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=256)

CASES = {
    "mpt": {},  # MPT-7B's settings: ALiBi (maximum bias 8), no biases, a 4x MLP
    # six heads (slopes from the power of two above), q/k/v clipped at 0.5 (random weights give outputs of
    # about unit size, so the clamp bites), a softmax scale that is not 1/sqrt(head_dim)
    "mpt-6heads-clip": {"d_model": 96, "n_heads": 6, "attn_config": {"clip_qkv": 0.5, "softmax_scale": 0.2}},
    "mpt-biases": {"no_bias": False, "expansion_ratio": 2, "attn_config": {"alibi_bias_max": 4}},
    "mpt-learned-positions": {"attn_config": {"alibi": False}},
}


def _as_mosaicml(hf, config: dict, seed: int = 5) -> None:
    """transformers' MptForCausalLM builds no biases, a 4x MLP and ALiBi of maximum bias 8 whatever the
    config says. Give the reference what the config asks for, as MosaicML's MPT builds it: biases on every
    Linear and LayerNorm, the MLP `expansion_ratio` wide, the slopes of `alibi_bias_max`, and with ALiBi off
    a learned position embedding (transformer.wpe) added to the token embedding."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    t, attn = hf.transformer, config.get("attn_config", {})
    g = torch.Generator().manual_seed(seed)
    d = hf.config.d_model

    def rand(*shape, scale):
        return nn.Parameter(torch.randn(*shape, generator=g) * scale)

    with torch.no_grad():
        for block in t.blocks:
            inter = config.get("expansion_ratio", 4) * d
            block.ffn.up_proj, block.ffn.down_proj = nn.Linear(d, inter, bias=False), nn.Linear(inter, d, bias=False)
            for lin in (block.ffn.up_proj, block.ffn.down_proj):
                lin.weight = rand(lin.out_features, lin.in_features, scale=lin.in_features ** -0.5)
        if not config.get("no_bias", True):
            for m in t.modules():
                if isinstance(m, (nn.Linear, nn.LayerNorm)):
                    m.bias = rand(m.weight.shape[0], scale=0.2)
    if "alibi_bias_max" in attn:
        t.build_mpt_alibi_tensor = lambda heads, length, alibi_bias_max=8, device=None: build_mpt_alibi_tensor(
            heads, length, attn["alibi_bias_max"], device)
    if attn.get("alibi") is False:
        t.build_mpt_alibi_tensor = lambda *args, **kwargs: None  # MptAttention skips a None position bias
        t.wpe = nn.Embedding(hf.config.max_seq_len, d)
        t.wpe.weight = rand(hf.config.max_seq_len, d, scale=1.0)
        past = {}

        def note_past(module, args, kwargs):
            cache = kwargs.get("cache")
            past["len"] = 0 if cache is None else cache.get_seq_length()

        def add_positions(module, args, out):
            return out + t.wpe(torch.arange(past["len"], past["len"] + out.shape[1]))

        t.register_forward_pre_hook(note_past, with_kwargs=True)
        t.wte.register_forward_hook(add_positions)


@pytest.fixture(scope="module")
def mpt(tmp_path_factory):
    made = {}

    def get(case: str):
        if case not in made:
            folder = str(tmp_path_factory.mktemp(case))
            config = {**SMALL, **CASES[case]}
            hf = family.build(folder, "MptConfig", "MptForCausalLM", config, seed=4)
            if case in ("mpt-biases", "mpt-learned-positions"):
                _as_mosaicml(hf, config)
                hf.save_pretrained(folder)
            made[case] = (folder, hf)
        return made[case]
    return get


@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", ["mpt", "mpt-6heads-clip"])
def test_mpt_matches_transformers(mpt, case, backend):
    folder, hf = mpt(case)
    family.check_logits_and_greedy(family.engine(folder, backend), hf, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", ["mpt-biases", "mpt-learned-positions"])
def test_mpt_config_driven_variants_match_mosaicml(mpt, case, backend):
    folder, hf = mpt(case)
    family.check_logits_and_greedy(family.engine(folder, backend), hf, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mpt", "mpt-6heads-clip", "mpt-learned-positions"])
def test_mpt_batched_prefix_hits_and_chunks(mpt, case):
    folder, hf = mpt(case)
    family.check_engine_paths(folder, hf, case, family.backends()[0])


@pytest.mark.parametrize("case", ["mpt", "mpt-6heads-clip"])
def test_mpt_peft_adapter(mpt, tmp_path, case):
    folder, hf = mpt(case)
    family.check_peft(folder, hf, case, str(tmp_path / "adapter"), family.backends()[0], r=4, lora_alpha=8,
                      target_modules=["Wqkv", "out_proj"])


def test_mpt_config_keys():
    cfg = ModelConfig.from_hf({"architectures": ["MptForCausalLM"], "vocab_size": 256, "d_model": 64, "n_heads": 4,
                               "n_layers": 3, "expansion_ratio": 3, "max_seq_len": 512, "no_bias": False,
                               "attn_config": {"clip_qkv": 6}})
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (64, 4, 4, 3)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.head_dim) == (192, 512, 16)
    assert cfg.attention_bias and cfg.mlp_bias and cfg.tie_word_embeddings
    assert cfg.extra["attn_config"]["alibi"] and cfg.extra["attn_config"]["alibi_bias_max"] == 8


@pytest.mark.parametrize("setting, match", [
    ({"attn_config": {"attn_type": "multiquery_attention"}}, "attn_type"),
    ({"attn_config": {"qk_ln": True}}, "qk_ln"),
    ({"attn_config": {"prefix_lm": True}}, "prefix_lm"),
    ({"logit_scale": 0.5}, "logit_scale"),
    ({"norm_type": "rmsnorm"}, "norm_type"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_type"),
])
def test_mpt_refuses_what_it_does_not_implement(setting, match):
    raw = {"architectures": ["MptForCausalLM"], "vocab_size": 256, "d_model": 64, "n_heads": 4, "n_layers": 2,
           **setting}
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize("max_bias", [8, 4, 16])
@pytest.mark.parametrize("heads", [4, 6, 8, 12])
def test_alibi_slopes_match_mpt(heads, max_bias):
    """keel.layers.attention.alibi_slopes(interleave_rest=True) against build_mpt_alibi_tensor, whose bias is
    slope * (key - last position): the key one before the last holds -slope."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    theirs = -build_mpt_alibi_tensor(heads, 3, max_bias)[:, 0, 1]
    ours = torch.tensor(alibi_slopes(heads, max_bias, interleave_rest=True), dtype=torch.float64)
    assert torch.allclose(ours, theirs.double(), rtol=1e-6, atol=0)
