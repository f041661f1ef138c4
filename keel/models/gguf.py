"""Read a GGUF file (llama.cpp's format) into a Hugging Face-style config, tokenizer and weights.

The rest of keel only knows Hugging Face checkpoints, so this module translates: GGUF metadata
becomes a config.json dict, the embedded vocabulary becomes a `tokenizers.Tokenizer`, and GGUF
tensor names, layouts and quantized types become HF names, [out, in] shapes and float32.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from keel.errors import ModelLoadError, UnsupportedModelError

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# llama.cpp's converter reorders q/k rows for these (its rope pairs adjacent dims, HF pairs halves).
_PERMUTED_ARCHITECTURES = {"llama", "mistral"}

# Names in the gguf package; a type the installed gguf lacks is simply not accepted.
_SUPPORTED_TYPES = {
    getattr(GGMLQuantizationType, name)
    for name in ("F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K").split()
    if hasattr(GGMLQuantizationType, name)
}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Split regexes of the original HF tokenizers; llama.cpp names them by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Same as Llama 3's except that every digit is its own piece.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLIT_PRE = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
              "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class GGUFCheckpoint:
    config: dict
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    path: str
    # (hf_name, gguf tensor) pairs, validated up front so that tensors() cannot fail halfway.
    _entries: list = field(default_factory=list, repr=False, compare=False)
    _buf: memoryview | None = field(default=None, repr=False, compare=False)  # the memmapped file

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, float32 tensor) one at a time; only one dequantized tensor is alive."""
        arch = self.config["model_type"]
        for name, tensor in self._entries:
            yield name, _to_torch(tensor, self._buf, name, arch, self.config)


def read_gguf(path: str) -> GGUFCheckpoint:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        meta, infos, buf = _parse(path)
    except ModelLoadError:
        raise
    except Exception as e:  # numpy/struct/unicode errors from a damaged file
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from e

    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHITECTURES)})"
        )
    for needed in ("token_embd.weight", "tokenizer.ggml.tokens"):
        if needed not in infos and needed not in meta:
            raise ModelLoadError(f"{path}: GGUF file has no {needed}")
    # rope_freqs.weight is folded into config["rope_scaling"] instead.
    entries = [(_hf_name(t.name, path), t) for t in infos.values() if t.name != "rope_freqs.weight"]

    config = _config(meta, infos, buf, arch, path)
    tokenizer, tokens = _tokenizer(meta, path)
    bos_id, eos_id = config["bos_token_id"], config["eos_token_id"]
    # Chat models often end a turn with a different token than eos (Llama 3's <|eot_id|>).
    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if k in meta]
    return GGUFCheckpoint(
        config=config,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=tokens[bos_id] if bos_id is not None else None,
        eos_token=tokens[eos_id] if eos_id is not None else None,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        path=path,
        _entries=entries,
        _buf=buf,
    )


@dataclass
class _TensorInfo:
    name: str
    shape: tuple  # HF order: outermost first
    type: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int

    def array(self, buf: memoryview) -> np.ndarray:
        """The raw bytes, one row per innermost dim, as gguf.quants.dequantize expects."""
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return np.frombuffer(buf, np.uint8, self.nbytes, self.offset).reshape(rows, -1)


# Scalar GGUF value types by their numbers in the file format.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _parse(path: str) -> tuple[dict, dict, memoryview]:
    # gguf.GGUFReader builds numpy views for every vocab string and takes ~3.5 s on a 49k vocab
    # (far longer on Llama 3's 128k); walking the header with struct takes ~0.1 s.
    buf = memoryview(np.memmap(path, dtype=np.uint8, mode="r"))
    pos = 0

    def read(fmt: str) -> Any:
        nonlocal pos
        value = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return value

    def read_str() -> str:
        nonlocal pos
        n = read("Q")
        if pos + n > len(buf):
            raise ModelLoadError(f"{path} is truncated (in the metadata)")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    def read_value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _STRING:
            return read_str()
        if vtype != _ARRAY:
            return read(_SCALARS[vtype])
        etype, n = read("I"), read("Q")
        if etype in _SCALARS:  # numeric arrays (token types, scores) in one numpy call
            dtype = np.dtype("<" + _SCALARS[etype])
            values = np.frombuffer(buf, dtype, n, pos).tolist()
            pos += n * dtype.itemsize
            return values
        return [read_value(etype) for _ in range(n)]

    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes)")
    pos = 4
    version = read("I")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (big-endian file?)")
    n_tensors, n_kv = read("Q"), read("Q")
    meta = {}
    for _ in range(n_kv):
        key = read_str()
        meta[key] = read_value(read("I"))
    raw = []
    for _ in range(n_tensors):
        name = read_str()
        dims = [read("Q") for _ in range(read("I"))]
        qtype = read("I")
        if qtype not in _SUPPORTED_TYPES:  # also catches types newer than the gguf package
            type_name = GGMLQuantizationType(qtype).name if qtype in set(GGMLQuantizationType) else qtype
            raise UnsupportedModelError(f"{path}: tensor {name} has unsupported type {type_name}")
        raw.append((name, dims, GGMLQuantizationType(qtype), read("Q")))
    align = meta.get("general.alignment", 32)
    data_start = -(-pos // align) * align
    infos = {}
    for name, dims, qtype, offset in raw:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise ModelLoadError(f"{path}: tensor {name} row of {dims[0]} is not whole {qtype.name} blocks")
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * block_bytes
        if data_start + offset + nbytes > len(buf):
            # A file cut inside the tensor data still has a whole header; catch it now, not mid-load.
            raise ModelLoadError(f"{path} is truncated: tensor {name} extends past the end of the file")
        # GGUF lists dims innermost first; HF wants [out, in].
        infos[name] = _TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes)
    return meta, infos, buf


def _hf_name(name: str, path: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base in _GLOBAL_TENSORS and suffix in ("weight", "bias"):
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    m = _BLOCK_NAME.fullmatch(name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    raise UnsupportedModelError(f"{path}: unexpected tensor {name!r}")


def _config(meta: dict, tensors: dict, buf: memoryview, arch: str, path: str) -> dict:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    if hidden is None or heads is None or get("block_count") is None:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.embedding_length/block_count/head_count")
    config = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        # The embedding is authoritative: the vocab list may be padded differently.
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(meta, arch, tensors.get("rope_freqs.weight"), buf, path)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta: dict, arch: str, rope_freqs, buf: memoryview, path: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind in ("linear", "yarn") and factor:
        scaling = {"rope_type": kind, "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = original
        return scaling
    if rope_freqs is None:
        return None
    # Llama 3.x: llama.cpp stores the per-frequency divisors instead of the HF parameters. Every
    # released Llama 3.x uses low/high freq factors 1 and 4 over an 8192 context, so rebuild the
    # divisors from those and accept the file only if they match.
    freqs = dequantize(rope_freqs.array(buf), rope_freqs.type).astype(np.float64).ravel()
    factor, low, high, old_ctx = float(freqs.max()), 1.0, 4.0, 8192
    dim = 2 * len(freqs)
    wavelen = 2 * np.pi / (meta.get(f"{arch}.rope.freq_base", 10000.0) ** -(np.arange(0, dim, 2) / dim))
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1 - smooth) / factor + smooth)
    if not np.allclose(freqs, expected, rtol=1e-3):
        raise UnsupportedModelError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old_ctx}


def _tokenizer(meta: dict, path: str) -> tuple[Tokenizer, list[str]]:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre == "smollm":
        # SmolLM's own tokenizer.json: single digits, then the GPT-2 split.
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _SPLIT_PRE:
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("default", "gpt2"):
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        # Guessing a split would tokenize differently from training; better to refuse.
        raise UnsupportedModelError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported")

    tokens = meta["tokenizer.ggml.tokens"]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # some vocabs repeat a string; keep the first id
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        # Llama 3 looks a whole piece up in the vocab before merging (its tokenizer.json says so).
        model = models.BPE(vocab, merges, ignore_merges=pre in ("llama3", "llama-bpe", "llama-v3"))
    except Exception as e:
        raise ModelLoadError(f"{path}: GGUF vocabulary is inconsistent with its merges: {e}") from e
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()

    # Without these, "<|im_start|>" in text would be split into bytes instead of staying one token.
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    template, specials = "$A", []
    for key, prepend in (("bos", True), ("eos", False)):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if meta.get(f"tokenizer.ggml.add_{key}_token") and tid is not None:
            template = f"{tokens[tid]} {template}" if prepend else f"{template} {tokens[tid]}"
            specials.append((tokens[tid], tid))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=template, pair=f"{template} {template.replace('$A', '$B:1')}", special_tokens=specials
        )
    return tok, tokens


def _to_torch(tensor: _TensorInfo, buf: memoryview, name: str, arch: str, config: dict) -> torch.Tensor:
    array = dequantize(tensor.array(buf), tensor.type).astype(np.float32, copy=False).reshape(tensor.shape)
    if arch in _PERMUTED_ARCHITECTURES and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
        n_head = config["num_attention_heads"] if ".q_proj." in name else config["num_key_value_heads"]
        array = _unpermute(array, n_head)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")  # F32 data is a view of the read-only memmap
    return torch.from_numpy(array)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp did: w.reshape(n_head, 2, rows//n_head//2, ...).swapaxes(1, 2); this undoes it.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
