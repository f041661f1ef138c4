"""GGUF vocabularies beyond byte-level BPE with a known split: SentencePiece ("llama": Llama 2, Mistral, Phi-3,
Gemma) and Falcon's byte-level BPE (pre-tokenizer "falcon"), in small GGUF files written here. keel's
tokenizer must give transformers' ids and text back: for SentencePiece transformers' own GGUF loading of the
same file, for Falcon a tokenizer.json with Falcon's published pipeline (transformers reads a Falcon GGUF
with GPT-2's split, which is not Falcon's)."""

from __future__ import annotations

import heapq
import json
import os
import random
from dataclasses import dataclass, field

import gguf
import numpy as np
import pytest
import regex
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from keel import SamplingParams
from keel.models.gguf import read_gguf
from keel.models.gguf_tokenizer import SPACE, spm_merges
from tests.models import family
from tests.models.conftest import BASE
from tests.models.test_gguf_families import _converted, _metadata

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

T = gguf.TokenType
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Then the theory of the thing is that they think.",
    "Hello, world! How are you today? I'm fine, thanks; and you?",
    "def tokenize(text):\n    return text.split()  # words\n\nprint(tokenize('hello there'))\n",
    "In 2024 there were 1234567 users, up 12.5% from 987,654 (see table 3).",
    "Мир и мама: русский язык. Café, naïve, résumé.",
]
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space", "  two leading spaces", "trailing spaces   ", "multiple    inner   spaces",
    "line one\nline two\n\n\tindented\r\nwindows",
    "naïve café, 日本語, Ελληνικά 🤗👍🏽",  # characters outside the vocabulary: byte fallback
    "In 2024, 1234567 users; x=3.14159!",
    "", " ", "\n",
]


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    ids: dict  # bos/eos/unknown/padding -> id
    specials_text: str  # text with the family's special tokens in it
    meta: dict = field(default_factory=dict)  # other tokenizer.ggml.* keys


def _pieces() -> tuple[list[str], list[str]]:
    """(merged pieces in the order a BPE learned them, single characters): a SentencePiece BPE vocabulary's
    tokens, "▁" starting each word."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=360, show_progress=False))
    merged = ["".join(pair) for pair in _merges(tok)]
    chars = sorted(t for t in tok.get_vocab() if len(t) == 1)
    return merged, chars


def _merges(tok: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


BYTES = [f"<0x{b:02X}>" for b in range(256)]


def spm_vocab(style: str) -> Vocab:
    """A SentencePiece vocabulary laid out as the family's: special tokens first, the 256 byte tokens, the
    pieces by falling score, the single characters last (Llama 2, Mistral, Phi-3); Gemma's with its ids,
    runs of spaces spelled with real spaces, and scores that do not follow the pieces' order."""
    merged, chars = _pieces()
    n = len(merged)
    if style == "gemma":
        head = [("<pad>", T.CONTROL), ("<eos>", T.CONTROL), ("<bos>", T.CONTROL), ("<unk>", T.UNKNOWN),
                ("<mask>", T.USER_DEFINED), ("<start_of_turn>", T.USER_DEFINED), ("<end_of_turn>", T.USER_DEFINED)]
        spaces = [" " * k for k in range(2, 5)]
        body = [*BYTES, *spaces, *merged, *chars]
        types = [t for _, t in head] + [T.BYTE] * 256 + [T.USER_DEFINED] * len(spaces) + [T.NORMAL] * (n + len(chars))
        scores = [0.0] * len(head) + [float(s) for s in random.Random(0).sample(range(len(body)), len(body))]
        return Vocab([t for t, _ in head] + body, scores, types, {"bos": 2, "eos": 1, "unknown": 3, "padding": 0},
                     "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
                     {"add_space_prefix": False})
    head = [("<unk>", T.UNKNOWN), ("<s>", T.CONTROL), ("</s>", T.CONTROL)]
    tail = [("<think>", T.USER_DEFINED)]
    text = "<s>Hello</s> world<think>why not</s> <unk>"
    if style == "phi3":  # Phi-3's chat tokens come after the vocabulary
        tail = [("<|endoftext|>", T.CONTROL), ("<|assistant|>", T.USER_DEFINED), ("<|end|>", T.CONTROL),
                ("<|user|>", T.USER_DEFINED)]
        text = "<|user|>\nHi there<|end|>\n<|assistant|>\n"
    tokens = [t for t, _ in head] + BYTES + merged + chars + [t for t, _ in tail]
    types = [t for _, t in head] + [T.BYTE] * 256 + [T.NORMAL] * (n + len(chars)) + [t for _, t in tail]
    scores = [0.0] * (len(head) + 256) + [-float(i) for i in range(n + len(chars))] + [0.0] * len(tail)
    return Vocab(tokens, scores, types, {"bos": 1, "eos": 2, "unknown": 0}, text)


def write_tokenizer_meta(w: gguf.GGUFWriter, v: Vocab, model: str, chat_template: str | None = None) -> None:
    w.add_tokenizer_model(model)
    w.add_token_list(v.tokens)
    if v.scores:
        w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    for key, tid in v.ids.items():
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", tid)
    for key, value in v.meta.items():
        if isinstance(value, bool):
            w.add_bool(f"tokenizer.ggml.{key}", value)
        elif isinstance(value, str):
            w.add_string(f"tokenizer.ggml.{key}", value)
        else:
            w.add_array(f"tokenizer.ggml.{key}", value)
    if chat_template:
        w.add_chat_template(chat_template)


def write_vocab_gguf(path: str, arch: str, v: Vocab, model: str = "llama") -> str:
    """A GGUF file that is only a vocabulary: the metadata an architecture's config needs and the tensors
    it reads shapes from, zeros."""
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_layer_norm_eps(1e-5)
    write_tokenizer_meta(w, v, model)
    w.add_tensor("token_embd.weight", np.zeros((len(v.tokens), 8), np.float32))
    if arch == "falcon":
        w.add_tensor("blk.0.ffn_down.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_spm(text: str, v: Vocab, prefix: bool = True) -> list[int]:
    """llama.cpp's SentencePiece tokenization of plain text (llm_tokenizer_spm), written out: spaces become
    "▁" (one more in front), then the adjacent pair that makes the best-scoring token is joined (the leftmost
    of equals) until none makes a token; a piece that is no token goes out as its bytes."""
    if not text:
        return []
    ids = {t: i for i, t in enumerate(v.tokens)}
    syms = list(((" " if prefix else "") + text).replace(" ", SPACE))
    while True:
        pairs = [(-v.scores[ids[a + b]], i) for i, (a, b) in enumerate(zip(syms, syms[1:])) if a + b in ids]
        if not pairs:
            break
        _, i = heapq.nsmallest(1, pairs)[0]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return [t for s in syms for t in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(style, arch, tokenizer.ggml.* keys) -> (folder, file name, Vocab) of a vocabulary-only GGUF file, written
    once per module."""
    folder, made = str(tmp_path_factory.mktemp("spm")), {}

    def get(style: str, arch: str, **meta):
        key = (style, arch, tuple(sorted(meta.items())))
        if key not in made:
            v = spm_vocab(style)
            v.meta.update(meta)
            name = f"{style}-{arch}-{len(made)}.gguf"
            write_vocab_gguf(os.path.join(folder, name), arch, v)
            made[key] = (folder, name, v)
        return made[key]
    return get


def _hf(folder: str, name: str, **kwargs):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, gguf_file=name, **kwargs)


def _same_as_transformers(tok, hf, texts: list[str]) -> None:
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == hf(text)["input_ids"], (text, tok.encode(text).tokens)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


# Llama 2 and Mistral (Metaspace), Phi-3 (a normalizer prepends the "▁"), Gemma (no "▁" prepended, merges by
# the order of the tokens)
SPM_CASES = [("llama", "llama"), ("llama", "mistral"), ("phi3", "phi3"), ("gemma", "gemma2")]


@pytest.mark.parametrize("style, arch", SPM_CASES)
def test_sentencepiece_matches_transformers(files, style, arch):
    folder, name, v = files(style, arch)
    tok = read_gguf(os.path.join(folder, name)).tokenizer
    _same_as_transformers(tok, _hf(folder, name), TEXTS + CORPUS + [v.specials_text])
    # bos added by default (the file has no add_bos_token), a special token's text stays one token
    ids = tok.encode(v.specials_text).ids
    assert ids[0] == v.ids["bos"]
    marked = [i for i, (t, ty) in enumerate(zip(v.tokens, v.types))
              if ty in (T.CONTROL, T.USER_DEFINED) and t.strip() and t in v.specials_text]
    assert len(marked) >= 3 and all(i in ids for i in marked)


@pytest.mark.parametrize("style", ["llama", "phi3"])
def test_sentencepiece_is_llama_cpps_on_plain_text(files, style):
    """On text without special tokens, the merges recovered from the scores join pieces exactly as llama.cpp's
    SentencePiece does (the scores differ between all pieces here, so no tie decides)."""
    folder, name, v = files(style, style)
    tok = read_gguf(os.path.join(folder, name)).tokenizer
    for text in TEXTS + CORPUS:
        if style == "phi3" or not text.startswith(" "):  # Metaspace does not add a "▁" before a space
            assert tok.encode(text, add_special_tokens=False).ids == llama_cpp_spm(text, v), text


def test_no_space_prefix_no_bos(files):
    """add_space_prefix false: no "▁" in front, as llama.cpp tokenizes it and as transformers' Llama tokenizer
    told add_prefix_space=False does (its GGUF loading ignores the flag); add_bos_token false: no bos."""
    from transformers import LlamaTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (add_gguf_special_tokens, get_gguf_tokenizer,
                                                                       get_merges)

    folder, name, v = files("llama", "llama", add_space_prefix=False, add_bos_token=False)
    tok = read_gguf(os.path.join(folder, name)).tokenizer
    for text in TEXTS:
        assert tok.encode(text).ids == llama_cpp_spm(text, v, prefix=False), text
    _, spec, _ = get_gguf_tokenizer(os.path.join(folder, name))
    hf = LlamaTokenizer(vocab={t: i for i, t in enumerate(spec["tokens"])}, merges=get_merges(spec),
                        add_prefix_space=False, add_bos_token=False)
    _same_as_transformers(tok, add_gguf_special_tokens(hf, spec), TEXTS + CORPUS + [v.specials_text])
    assert SPACE + "Hello" in v.tokens and not tok.encode("Hello").tokens[0].startswith(SPACE)


@pytest.mark.parametrize("scores", ["falling", "zero", "few"])
def test_merges_in_transformers_order(scores):
    """Ties (equal scores: all of them in some files) break as transformers breaks them."""
    from transformers.tokenization_utils_base import generate_merges
    v = spm_vocab("llama")
    vocab = {t: i for i, t in enumerate(v.tokens)}
    values = {"falling": v.scores, "zero": [0.0] * len(v.tokens), "few": [float(i % 3) for i in range(len(v.tokens))]}
    priority = dict(zip(v.tokens, values[scores]))
    assert spm_merges(vocab, priority) == generate_merges(vocab, priority)


def test_gemma_spaces_and_order(files):
    """Gemma: the file's "  " is the vocabulary's "▁▁", and the pieces' order, not their scores, ranks merges."""
    folder, name, v = files("gemma", "gemma2")
    tok = read_gguf(os.path.join(folder, name)).tokenizer
    assert tok.encode("a    b", add_special_tokens=False).tokens == ["a", SPACE * 4, "b"]
    assert tok.token_to_id(SPACE * 2) == v.tokens.index("  ")


# --- Falcon ------------------------------------------------------------------------------------------------

# tiiuae/falcon-7b's tokenizer.json pre-tokenizer and decoder; its first ids are these special tokens
FALCON_PRE = pre_tokenizers.Sequence([
    pre_tokenizers.Punctuation(behavior="contiguous"), pre_tokenizers.ByteLevel(add_prefix_space=False),
    pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), "isolated")])
FALCON_SPECIALS = [">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<", ">>ANSWER<<",
                   ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<", ">>MIDDLE<<", "<|endoftext|>"]
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_FALCON split, each regex cutting the pieces of the one before
LLAMA_CPP_FALCON = [r"[\p{P}\$\+<=>\^~\|`]+",
                    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                    r"[0-9][0-9][0-9]"]
FALCON_TEXTS = TEXTS + CORPUS + ["price: 12,345.67", "(555) 123-4567 ext. 89", "Don't stop at 3.14159265!!", "a  12",
                                 " 999", "мир", "x²y ½", ">>QUESTION<<What is 2+2?>>ANSWER<<4<|endoftext|>"]


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    """(keel's tokenizer of a Falcon GGUF file, transformers' tokenizer of the tokenizer.json it came from)."""
    from transformers import AutoTokenizer
    folder = str(tmp_path_factory.mktemp("falcon"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = FALCON_PRE, decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=FALCON_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}')
    hf = AutoTokenizer.from_pretrained(folder)

    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) for m in _merges(tok)]
    eot = vocab["<|endoftext|>"]
    v = Vocab(tokens, [], [T.CONTROL if t in FALCON_SPECIALS else T.NORMAL for t in tokens],
              {"bos": eot, "eos": eot}, "", {"pre": "falcon", "merges": merges})
    path = write_vocab_gguf(os.path.join(folder, "falcon.gguf"), "falcon", v, model="gpt2")
    return read_gguf(path).tokenizer, hf


def test_falcon_matches_its_tokenizer_json(falcon):
    tok, hf = falcon
    _same_as_transformers(tok, hf, FALCON_TEXTS)


def _llama_cpp_pieces(text: str) -> list[str]:
    pieces = [text]
    for pattern in LLAMA_CPP_FALCON:  # matches and the text between them both stay pieces
        pieces = [p for piece in pieces for p in regex.split(f"({pattern})", piece) if p]
    return pieces


def test_falcon_split_is_llama_cpps_but_for_digits(falcon):
    """Pieces as llama.cpp's "falcon" regexes cut the text, where they agree with Falcon's tokenizer.json: on
    text without digits or characters whose UTF-8 bytes show as numbers. Where they disagree keel follows the
    tokenizer.json: a space before one or two digits is a piece of its own."""
    tok, _ = falcon
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def ours(text):
        return [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]

    def theirs(text):
        return ["".join(s for s, _ in spell.pre_tokenize_str(p)) for p in _llama_cpp_pieces(text)]
    plain = [t for t in TEXTS + CORPUS if not any(c.isnumeric() for p in theirs(t) for c in p)]
    assert len(plain) > 10
    for text in plain:
        assert ours(text) == theirs(text), text
    # three digits or more: llama.cpp's last regex cuts the space off too
    assert theirs("in 2024") == ours("in 2024") == ["in", "Ġ", "202", "4"]
    assert theirs("a 12") == ["a", "Ġ12"] and ours("a 12") == ["a", "Ġ", "12"]


# --- a model ---------------------------------------------------------------------------------------------

PHI3_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def test_phi3_model_with_sentencepiece_vocab(tmp_path):
    """A tiny Phi-3 GGUF file with a SentencePiece vocabulary and a chat template: keel loads it, renders a
    chat as the template says, tokenizes it as transformers does, and generates transformers' greedy tokens."""
    v = spm_vocab("phi3")
    v.ids["eos"] = v.tokens.index("<|end|>")
    hf = family.build(str(tmp_path / "hf"), "Phi3Config", "Phi3ForCausalLM",
                      {**BASE, "vocab_size": len(v.tokens), "pad_token_id": 0}, seed=3)
    path = str(tmp_path / "phi3.gguf")  # alone in its folder: transformers would read the HF folder's tokenizer
    w = gguf.GGUFWriter(path, "phi3")
    _metadata(w, "phi3", hf)
    write_tokenizer_meta(w, v, "llama", PHI3_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, hf.config.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), _converted("phi3", hf, name,
                                                                                          tensor.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    llm = family.engine(path)
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    text = llm.tokenizer.apply_chat_template(messages)
    assert text == "<|user|>\nHello there, how are you?<|end|>\n<|assistant|>\n"
    ids = llm.tokenizer.encode_chat(messages)
    ref = _hf(str(tmp_path), "phi3.gguf")
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == v.tokens.index("<|user|>") and llm.tokenizer.eos_token == "<|end|>"
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out[0].outputs[0].token_ids == family.hf_greedy(hf, ids, 8)
