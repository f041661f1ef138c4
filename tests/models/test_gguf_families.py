"""GGUF files of the phi3, gemma2, gemma3, falcon and mpt architectures, written here from tiny transformers
checkpoints the way llama.cpp's converter (convert_hf_to_gguf.py) writes them: its tensor names (gguf's own
TensorNameMap), its metadata keys and its changes to tensors (Gemma's norms + 1, Falcon's regrouped
query_key_value rows, Phi-3's LongRoPE factors as tensors). keel reading such a file must give the tensors
of the HF checkpoint back, and the same logits and greedy tokens as keel (and transformers) on the HF folder,
with F32 tensors and with Q8_0 blocks (which keel's CPU kernels compute with as they are)."""

from __future__ import annotations

import math
import os

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from keel import SamplingParams
from keel.errors import UnsupportedModelError
from keel.models.gguf import GGUFBlocks, read_gguf
from tests.models import family
from tests.models.conftest import BASE
from tests.models.test_mpt import _as_mosaicml

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HEAD = BASE["hidden_size"] // BASE["num_attention_heads"]
WINDOW = 8  # smaller than the harness's prompts (up to 41 tokens)
FALCON = dict(vocab_size=family.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=96,
              max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
MPT = dict(vocab_size=family.VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=256, bos_token_id=0,
           eos_token_id=1)


def _longrope(trained: int, rotary: int) -> dict:
    n = rotary // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": trained,
            "short_factor": [1.0 + 0.25 * i for i in range(n)], "long_factor": [2.0 + 1.5 * i for i in range(n)]}


# name -> (GGUF architecture, transformers config class, model class, config). Only what a GGUF file can say:
# llama.cpp fixes Gemma's query scale (the head size), its layer pattern and Gemma 3's local rope theta.
CASES = {
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM", {**BASE, "pad_token_id": 0}),
    # Phi-3.5 / Phi-4-mini: LongRoPE past the pretraining length (16), three quarters of each head rotating,
    # Phi-3-mini's sliding window
    "phi3-longrope": ("phi3", "Phi3Config", "Phi3ForCausalLM", {
        **BASE, "pad_token_id": 0, "max_position_embeddings": 64, "original_max_position_embeddings": 16,
        "sliding_window": WINDOW, "rope_parameters": {**_longrope(16, HEAD * 3 // 4), "partial_rotary_factor": 0.75}}),
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", {
        **BASE, "head_dim": HEAD, "pad_token_id": 0, "sliding_window": WINDOW, "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0, "query_pre_attn_scalar": HEAD}),
    # six layers: five local, one global (llama.cpp's pattern); linear x8 on the global rotary table
    "gemma3": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", {
        **BASE, "head_dim": HEAD, "pad_token_id": 0, "num_hidden_layers": 6, "sliding_window": WINDOW,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "final_logit_softcapping": 5.0, "query_pre_attn_scalar": HEAD}),
    "falcon-7b": ("falcon", "FalconConfig", "FalconForCausalLM", {**FALCON, "multi_query": True}),
    # two key/value groups of two query heads, two LayerNorms (ln_attn, ln_mlp)
    "falcon-40b": ("falcon", "FalconConfig", "FalconForCausalLM", {
        **FALCON, "new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon-11b": ("falcon", "FalconConfig", "FalconForCausalLM", {
        **FALCON, "new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1}),
    "mpt": ("mpt", "MptConfig", "MptForCausalLM", MPT),
    # six heads, q/k/v clipped at 0.5 (random weights give outputs of about unit size, so the clamp bites)
    "mpt-6heads-clip": ("mpt", "MptConfig", "MptForCausalLM", {
        **MPT, "d_model": 96, "n_heads": 6, "attn_config": {"clip_qkv": 0.5}}),
    # MosaicML's MPT as transformers' port cannot build it (see tests/models/test_mpt.py): biases on every
    # Linear and LayerNorm, a 2x MLP, learned positions (position_embd) instead of ALiBi (maximum bias 0)
    "mpt-biases-positions": ("mpt", "MptConfig", "MptForCausalLM", {
        **MPT, "no_bias": False, "expansion_ratio": 2, "attn_config": {"alibi": False}}),
}
FAST = ["phi3", "gemma2", "falcon-40b", "mpt"]  # one per family in the fast subset
PRE = {"falcon": "falcon", "mpt": "mpt"}  # tokenizer.ggml.pre, as real files say it
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 single-byte tokens: the tiny models' vocabulary


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    """w rounded to what Q8_0 blocks hold."""
    q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape))


def _quantizable(name: str, w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[-1] % 32 == 0 and name.endswith(".weight")


def _converted(arch: str, hf, name: str, w: np.ndarray) -> np.ndarray:
    """What convert_hf_to_gguf.py's modify_tensors does to a tensor of these architectures."""
    cfg = hf.config
    if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
        return w + 1  # llama.cpp multiplies by the weight, Gemma by 1 + the weight
    if arch == "falcon" and "query_key_value" in name:
        # per key/value group (its query heads, its key, its value) -> all queries, all keys, all values.
        # Falcon-7B's config.json (multi-query) has no num_kv_heads: the converter takes 1.
        H, KVH = cfg.num_attention_heads, cfg.num_kv_heads if cfg.new_decoder_architecture else 1
        D = cfg.hidden_size // H
        qkv = w.reshape(KVH, H // KVH + 2, D, *w.shape[1:])
        parts = (qkv[:, :-2].reshape(H * D, *w.shape[1:]), qkv[:, -2].reshape(KVH * D, *w.shape[1:]),
                 qkv[:, -1].reshape(KVH * D, *w.shape[1:]))
        return np.concatenate(parts)
    return w


def _metadata(writer: gguf.GGUFWriter, arch: str, hf) -> list[tuple[str, np.ndarray]]:
    """The converter's set_gguf_parameters for the architecture; returns the extra tensors it writes."""
    c, w = hf.config, writer
    if arch == "phi3":
        rope = c.rope_parameters
        rot = int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
        trained = rope.get("original_max_position_embeddings", c.original_max_position_embeddings)
        w.add_context_length(c.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(trained)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(rot)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(c.sliding_window or 0)
        if not rope.get("long_factor"):
            return []
        scale = c.max_position_embeddings / trained
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(trained)) if scale > 1 else 1.0)
        return [("rope_factors_long.weight", np.array(rope["long_factor"], np.float32)),
                ("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))]
    if arch in ("gemma2", "gemma3"):
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_sliding_window(c.sliding_window)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
            w.add_final_logit_softcapping(c.final_logit_softcapping)
            return []
        full = c.rope_parameters["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        if c.final_logit_softcapping:
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        return []
    if arch == "falcon":
        w.add_context_length(2048)  # "not in config.json"
        w.add_tensor_data_layout("jploski")
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(4 * c.hidden_size)  # whatever ffn_hidden_size says
        w.add_block_count(c.num_hidden_layers)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_kv_heads if c.new_decoder_architecture else 1)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        return []
    a = c.attn_config
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(4 * c.d_model)
    w.add_head_count(c.n_heads)
    w.add_layer_norm_eps(1e-5)
    if a.clip_qkv is not None:
        w.add_clamp_kqv(a.clip_qkv)
    w.add_max_alibi_bias(a.alibi_bias_max if a.alibi else 0.0)
    return []


def write_gguf(path: str, arch: str, hf, quantize: bool = False) -> dict[str, np.ndarray]:
    """The GGUF file of transformers model `hf`, as llama.cpp's converter writes it, with a byte-level BPE
    vocabulary; 2-D weights in Q8_0 blocks where `quantize`. Returns GGUF name -> the tensor written (F32)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf.config.num_hidden_layers)
    w = gguf.GGUFWriter(path, arch)
    extra = _metadata(w, arch, hf)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE.get(arch, "default"))
    w.add_token_list(ALPHABET)
    w.add_token_types([gguf.TokenType.NORMAL] * len(ALPHABET))
    w.add_bos_token_id(hf.config.bos_token_id)
    w.add_eos_token_id(hf.config.eos_token_id)
    written = {}
    tied = hf.config.tie_word_embeddings
    for name, tensor in hf.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # the checkpoint does not hold it
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        data = _converted(arch, hf, name, tensor.float().numpy())
        if quantize and _quantizable(name, tensor):
            w.add_tensor(gname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, data)
        written[gname] = data
    for gname, data in extra:
        w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """case -> (HF folder, transformers model, F32 GGUF path, Q8_0 GGUF path), built once per module. The
    weights are rounded to Q8_0's values first, so that all three files hold the same numbers."""
    cache = {}

    def get(case: str):
        if case not in cache:
            arch, cfg_name, model_name, config = CASES[case]
            folder = str(tmp_path_factory.mktemp(case))
            hf = family.build(folder, cfg_name, model_name, config, seed=7)
            if case == "mpt-biases-positions":
                _as_mosaicml(hf, config)
            with torch.no_grad():
                for name, p in hf.named_parameters():
                    if _quantizable(name, p):
                        p.copy_(_q8_0(p))
            hf.save_pretrained(folder)
            f32, q8 = os.path.join(folder, "f32.gguf"), os.path.join(folder, "q8_0.gguf")
            write_gguf(f32, arch, hf)
            write_gguf(q8, arch, hf, quantize=True)
            cache[case] = (folder, hf, f32, q8)
        return cache[case]
    return get


def _cases(fast: list[str]):
    return [c if c in fast else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


def _engine(path: str, case: str, backend: str):
    # LongRoPE: keel serves past the pretraining length with the long factors (see tests/models/test_phi3.py)
    return family.engine(path, backend, max_model_len=64 if case == "phi3-longrope" else None)


def _same_as_folder(gguf_path: str, folder: str, case: str, backend: str, label: str, rel: float = 1e-5) -> None:
    """keel on the GGUF file and keel on the HF folder: the same logits at every position and the same greedy
    tokens (the HF folder's keel model is checked against transformers by tests/models/test_<family>.py)."""
    ours, ref = _engine(gguf_path, case, backend), _engine(folder, case, backend)
    for prompt, a, b in zip(family.PROMPTS, family.keel_logits(ours, family.PROMPTS),
                            family.keel_logits(ref, family.PROMPTS)):
        span, diff = (b.max() - b.min()).item(), (a - b).abs().max().item()
        assert diff <= rel * span, f"{label}: max |logit diff| {diff:.3g} over range {span:.3g}"
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in ours.generate(family.PROMPTS, params)]
    assert got == [o.outputs[0].token_ids for o in ref.generate(family.PROMPTS, params)], label


@pytest.mark.parametrize("case", _cases(list(CASES)))
def test_tensors_are_the_checkpoints(made, case):
    """Every tensor comes back under its HF name with the checkpoint's values: the converter's changes
    (Gemma's + 1, Falcon's regrouped rows) undone, LongRoPE's factor tensors folded into the config."""
    _, hf, f32, _ = made(case)
    ckpt = read_gguf(f32)
    state = {k: v for k, v in hf.state_dict().items() if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    got = dict(ckpt.tensors())
    assert set(got) == set(state)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, state[name].float(), rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["falcon-40b", "phi3", "gemma2"])
def test_blocks_are_the_checkpoints(made, case):
    """Weights kept in their Q8_0 blocks (for keel.quant) come in HF row order too: Falcon's regrouped rows
    moved as whole rows of blocks."""
    _, hf, _, q8 = made(case)
    state = hf.state_dict()
    blocks = {n: t for n, t in read_gguf(q8).tensors(keep_blocks=(gguf.GGMLQuantizationType.Q8_0,))
              if isinstance(t, GGUFBlocks)}
    assert {n for n, t in state.items() if _quantizable(n, t)} - {"lm_head.weight"} <= set(blocks)
    for name, b in blocks.items():
        torch.testing.assert_close(b.dequantize(), state[name].float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", _cases(FAST))
def test_gguf_matches_hf_folder(made, case, backend):
    folder, _, f32, _ = made(case)
    _same_as_folder(f32, folder, case, backend, f"{case} F32")


@pytest.mark.parametrize("backend", family.backends())
@pytest.mark.parametrize("case", ["gemma2", pytest.param("phi3", marks=pytest.mark.slow),
                                  pytest.param("falcon-40b", marks=pytest.mark.slow),
                                  pytest.param("mpt", marks=pytest.mark.slow)])
def test_q8_0_blocks_match_hf_folder(made, case, backend):
    """Q8_0 blocks: kept as int8 groups where keel's kernels run (rows regrouped or fused as the model
    wants them), dequantized on PyTorch's path; the same numbers as the HF folder either way."""
    folder, _, _, q8 = made(case)
    llm = _engine(q8, case, backend)
    kept = llm.engine.quantization is not None
    assert kept == backend.startswith("keel"), "Q8_0 blocks are kept where keel's kernels run, only there"
    _same_as_folder(q8, folder, case, backend, f"{case} Q8_0", rel=1e-4)


@pytest.mark.parametrize("case", ["phi3", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_gguf_matches_transformers(made, case):
    """The GGUF file straight against transformers on the checkpoint it was written from."""
    _, hf, f32, _ = made(case)
    family.check_logits_and_greedy(_engine(f32, case, family.backends()[0]), hf, f"{case} GGUF")


def test_settings_llama_cpp_fixes(made):
    """What a Gemma file cannot say is llama.cpp's: the query scale is the head size, every sixth Gemma 3 layer
    is global, its local layers rotate with theta 10000; Falcon's feed-forward size is the tensor's."""
    gemma3 = read_gguf(made("gemma3")[2]).config
    assert gemma3["query_pre_attn_scalar"] == HEAD and gemma3["rope_local_base_freq"] == 1e4
    assert gemma3["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma3["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    falcon = read_gguf(made("falcon-40b")[2]).config
    assert (falcon["ffn_hidden_size"], falcon["num_kv_heads"], falcon["num_ln_in_parallel_attn"]) == (96, 2, 2)


def test_unsupported(tmp_path, made):
    """An MPT file with q/k LayerNorms (attn_q_norm) is refused when its config is read, naming the setting."""
    _, hf, _, _ = made("mpt")
    path = str(tmp_path / "qk.gguf")
    w = gguf.GGUFWriter(path, "mpt")
    _metadata(w, "mpt", hf)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(ALPHABET)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MPT, hf.config.n_layers)
    for name, tensor in hf.state_dict().items():
        if name != "lm_head.weight":
            w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy())
    w.add_tensor("blk.0.attn_q_norm.weight", np.ones(hf.config.d_model, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="qk_ln"):
        family.engine(path)
