"""Gemma 2 and Gemma 3 text (Gemma2ForCausalLM, Gemma3ForCausalLM) against transformers: scaled embeddings,
offset RMSNorms (four per layer, and Gemma 3's per-head q/k norms), GeGLU, query_pre_attn_scalar,
soft-capped scores and logits, local layers with a sliding window smaller than the prompts next to global
ones, Gemma 3's two rotary tables (and linear scaling on the global one), PEFT adapters, bfloat16, several
eos ids from generation_config.json, a Gemma-style chat template."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from keel import SamplingParams
from keel.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from keel.models.config import ModelConfig
from keel.models.gemma import (
    FULL,
    LOCAL_ROPE,
    SLIDING,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
)
from keel.tokenizer import Tokenizer
from tests.models import family
from tests.models.conftest import BASE, VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WINDOW = 8  # smaller than the harness's prompts (up to 41 tokens) and check_engine_paths' (up to 35)
SMALL = {**BASE, "head_dim": 16, "pad_token_id": 0}

# name -> (transformers config class, model class, overrides). Soft-caps and query_pre_attn_scalar are set
# so that they matter at these sizes: a cap of 50 on scores scaled by 256 ** -0.5 would change nothing.
CASES = {
    # layers local, global
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", {
        "sliding_window": WINDOW, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
        "query_pre_attn_scalar": 16}),
    # layers local, global, local; an untied head
    "gemma2-plain": ("Gemma2Config", "Gemma2ForCausalLM", {
        "num_hidden_layers": 3, "sliding_window": WINDOW, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "query_pre_attn_scalar": 32, "tie_word_embeddings": False}),
    # layers local, global, local by sliding_window_pattern; the local table at theta 100
    "gemma3-local": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "num_hidden_layers": 3, "sliding_window": WINDOW, "sliding_window_pattern": 2, "rope_theta": 10000.0,
        "rope_local_base_freq": 100.0, "query_pre_attn_scalar": 16}),
    # layers global, local by layer_types; linear x8 scaling on the global table (Gemma 3 4B and up)
    "gemma3-linear": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "layer_types": [FULL, SLIDING], "sliding_window": WINDOW, "rope_theta": 10000.0,
        "rope_local_base_freq": 100.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 16}),
}
FAST = ["gemma2-softcap", "gemma3-local"]  # one per family in the fast subset


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """case -> (checkpoint folder, transformers model), built once per module."""
    made = {}

    def get(case: str):
        if case not in made:
            cfg_name, model_name, overrides = CASES[case]
            folder = str(tmp_path_factory.mktemp(case))
            made[case] = (folder, family.build(folder, cfg_name, model_name, {**SMALL, **overrides}, seed=2))
        return made[case]
    return get


def _cases(fast: list[str]):
    return [c if c in fast else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", _cases(FAST))
def test_gemma_matches_transformers(gemma, case, backend):
    folder, hf = gemma(case)
    llm = family.engine(folder, backend)
    assert llm.engine.max_model_len > WINDOW  # the window shapes attention, it does not cap the context
    family.check_logits_and_greedy(llm, hf, case)


@pytest.mark.parametrize("case", _cases(["gemma2-softcap"]))
def test_gemma_batched_prefix_hits_and_chunks(gemma, case):
    folder, hf = gemma(case)
    family.check_engine_paths(folder, hf, case, family.backends()[0])


@pytest.mark.parametrize("case", _cases(["gemma3-local"]))
def test_gemma_peft_adapter(gemma, tmp_path, case):
    folder, hf = gemma(case)
    family.check_peft(folder, hf, case, str(tmp_path / "adapter"), family.backends()[0],
                      r=4, lora_alpha=8, target_modules="all-linear")


@pytest.mark.parametrize("case", ["gemma2-softcap", "gemma3-local"])
def test_window_cuts_the_context(gemma, case):
    """The same engine with the sliding layers' window removed: logits equal while a prompt fits in the
    window and differ past it, by far more than the tolerance against transformers."""
    folder, _ = gemma(case)
    llm = family.engine(folder)
    prompt = family.PROMPTS[2]
    with_window = family.keel_logits(llm, [prompt])[0]
    sliding = [layer.self_attn.attn for layer in llm.engine.model.model.layers if layer.sliding]
    assert sliding and all(a.scores.window == WINDOW for a in sliding)
    for a in sliding:
        a.scores = dataclasses.replace(a.scores, window=None)
    without = family.keel_logits(llm, [prompt])[0]
    span = (with_window.max() - with_window.min()).item()
    assert torch.allclose(with_window[:WINDOW], without[:WINDOW], rtol=0, atol=1e-6 * span)
    assert (with_window[WINDOW:] - without[WINDOW:]).abs().max().item() > 1e-2 * span


def test_kernel_table_names_what_runs(gemma):
    """Soft-capped and sliding layers take the eager attention, never keel's kernel (nor its fused
    rotary+cache pass); Gemma 3's one plain global layer may; no Gemma runs the one-call decode stack."""
    keel_backends = [b for b in family.backends() if b != "torch"]
    if not keel_backends:
        pytest.skip("no build of keel's CPU kernels runs on this machine")
    table = family.engine(gemma("gemma2-softcap")[0], keel_backends[0]).engine.backend.table()
    assert "keel" not in table["attention"] and table["attention"].startswith("torch eager"), table
    assert table["rotary+cache"] == "torch" and table["decode step"] == "module by module", table
    table = family.engine(gemma("gemma3-local")[0], keel_backends[0]).engine.backend.table()
    assert "torch eager" in table["attention"] and table["attention"].endswith("x2"), table  # the two local layers
    assert table["decode step"] == "module by module", table


def test_bfloat16_loads_and_generates(gemma):
    folder, hf = gemma("gemma2-softcap")
    llm = family.engine(folder, dtype="bfloat16")
    assert llm.engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = llm.generate([family.PROMPTS[2]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8
    # bfloat16 rounding only: logits near float32 transformers' (a wrong embedding scale or norm is not near)
    ours = family.keel_logits(llm, [family.PROMPTS[2]])[0].float()
    ref = family.hf_logits(hf, family.PROMPTS[2])
    assert (ours - ref).abs().max().item() < 0.05 * (ref.max() - ref.min()).item()


def test_eos_ids_from_generation_config(gemma, tmp_path):
    """Gemma's generation_config.json lists several eos ids (<eos> and <end_of_turn>): generation stops at any."""
    src, _ = gemma("gemma3-local")
    folder = str(tmp_path / "ckpt")
    shutil.copytree(src, folder)
    prompt = family.PROMPTS[1]
    free = family.engine(folder).generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i] and 1 not in tokens[:i + 1])
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [1, tokens[k]]}, f)
    llm = family.engine(folder)
    assert llm.engine.model_config.eos_token_ids == [1, tokens[k]]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[:k] == tokens[:k] and len(out.token_ids) <= k + 1


def test_legacy_gemma3_config_keys(gemma, tmp_path):
    """A config.json as transformers 4 wrote it (rope_theta, rope_scaling and rope_local_base_freq at the
    top, sliding_window_pattern instead of layer_types) loads to the same model."""
    src, hf = gemma("gemma3-local")
    folder = str(tmp_path / "legacy")
    shutil.copytree(src, folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    del cfg["layer_types"]
    cfg.update(rope_theta=rope[FULL]["rope_theta"], rope_local_base_freq=rope[SLIDING]["rope_theta"],
               rope_scaling=None, sliding_window_pattern=2, hidden_act="gelu")  # hidden_act is ignored, as there
    with open(path, "w") as f:
        json.dump(cfg, f)
    llm = family.engine(folder)
    mcfg = llm.engine.model_config
    assert (mcfg.rope_theta, mcfg.extra[LOCAL_ROPE]["rope_theta"]) == (10000.0, 100.0)
    assert mcfg.hidden_act == "gelu_pytorch_tanh"
    out = llm.generate([family.PROMPTS[2]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert out[0].outputs[0].token_ids == family.hf_greedy(hf, family.PROMPTS[2], 16)


def test_normalize_config_defaults_and_errors():
    g3 = Gemma3ForCausalLM.normalize_config({"num_hidden_layers": 7, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                             "rope_scaling": {"type": "linear", "factor": 8.0}})
    assert g3["layer_types"] == [SLIDING] * 5 + [FULL, SLIDING]  # one global layer in six
    assert g3["rope_parameters"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert g3[LOCAL_ROPE] == {"rope_type": "default", "rope_theta": 1e4}
    assert (g3["query_pre_attn_scalar"], g3["attn_logit_softcapping"], g3["tie_word_embeddings"]) == (256, None, True)
    g2 = Gemma2ForCausalLM.normalize_config({"num_hidden_layers": 4})
    assert g2["layer_types"] == [SLIDING, FULL] * 2
    assert (g2["attn_logit_softcapping"], g2["final_logit_softcapping"]) == (50.0, 30.0)
    assert g2["hidden_act"] == "gelu_pytorch_tanh"
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        Gemma3ForCausalLM.normalize_config({"num_hidden_layers": 2, "use_bidirectional_attention": True})
    with pytest.raises(ModelLoadError, match="layer_types"):
        Gemma2ForCausalLM.normalize_config({"num_hidden_layers": 3, "layer_types": [SLIDING, FULL]})
    with pytest.raises(UnsupportedModelError, match="chunked"):
        Gemma2ForCausalLM.normalize_config({"num_hidden_layers": 1, "layer_types": ["chunked_attention"]})


# A chat template in Gemma's format (written for this test): no system role (a system message opens the
# first user turn), turns between <start_of_turn> and <end_of_turn>, the assistant named "model".
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% set first = '' %}{% set msgs = messages %}"
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% endif %}"
    "{% for m in msgs %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_gemma_style_chat_template(gemma, tmp_path):
    src, _ = gemma("gemma2-softcap")
    folder = str(tmp_path / "chat")
    shutil.copytree(src, folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "t0", "eos_token": "t1", "chat_template": GEMMA_STYLE_TEMPLATE}, f)
    tok = Tokenizer.from_folder(folder)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "t0<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(InvalidRequestError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "Hi"}])


def test_embedding_scale_rounded_to_the_model_dtype():
    """sqrt(48) = 6.93 is 6.9375 in bfloat16: the reference multiplies by the rounded factor, and so does keel."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding
    hidden = 48
    ref = Gemma2TextScaledWordEmbedding(VOCAB, hidden, 0, embed_scale=hidden ** 0.5).to(torch.bfloat16)
    raw = {**SMALL, "hidden_size": hidden, "num_hidden_layers": 1, "architectures": ["Gemma2ForCausalLM"]}
    ours = Gemma2ForCausalLM(ModelConfig.from_hf(raw), 16, torch.bfloat16, "cpu")
    ours.model.embed_tokens.weight.data.copy_(ref.weight.data)
    ids = torch.arange(VOCAB)
    with torch.no_grad():
        assert torch.equal(ours.embed(ids), ref(ids))
