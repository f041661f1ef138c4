"""The GGUF architectures keel reads, each as what llama.cpp's converter (convert_hf_to_gguf.py) made of a
Hugging Face checkpoint, undone: the HF class, the HF name of every GGUF tensor, the metadata as
config.json keys (the family's own names, which its model class's normalize_config reads), and the
converter's changes to tensors:

- llama, mistral: q/k rows permuted for llama.cpp's rotary pairing (un-permuted here);
- phi3: q/k/v and gate/up stay fused as in the checkpoint (attn_qkv, ffn_up); LongRoPE's factor lists
  are tensors (rope_factors_long/short), folded back into the rope scaling; rope.dimension_count says
  the rotary share of a head; a sliding window of 0 means none;
- gemma2, gemma3: 1 added to every RMSNorm weight (llama.cpp multiplies by the weight, Gemma by 1 + the
  weight; keel's OffsetRMSNorm adds the 1 itself, so it is taken off here); the query scale, the
  local/global layer pattern and Gemma 3's local rope theta are not in the file: llama.cpp fixes them
  per architecture, and so does this module, the same way;
- falcon: the fused query_key_value rows regrouped from one (query heads, key, value) group per key/value
  head into all queries, then all keys, then all values (the "jploski" layout), regrouped back here;
  attn_norm is the MLP's LayerNorm (ln_mlp) where a second one (attn_norm_2, ln_attn) exists;
- mpt: names only; ALiBi's maximum bias 0 means learned positions (position_embd).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from gguf.quants import dequantize

from keel.errors import ModelLoadError, UnsupportedModelError


class FileView:
    """What a config translation reads of a GGUF file: its metadata (under the architecture's prefix) and tensors."""

    def __init__(self, meta: dict, infos: dict, buf, arch: str, path: str) -> None:
        self.meta, self.infos, self.buf, self.arch, self.path = meta, infos, buf, arch, path

    def get(self, key: str, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def need(self, *keys: str) -> list:
        missing = [k for k in keys if f"{self.arch}.{k}" not in self.meta]
        if missing:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {', '.join(f'{self.arch}.{k}' for k in missing)}")
        return [self.get(k) for k in keys]

    def has(self, tensor: str) -> bool:
        return tensor in self.infos

    def shape(self, tensor: str) -> tuple:
        if tensor not in self.infos:
            raise ModelLoadError(f"{self.path}: GGUF file has no {tensor}")
        return self.infos[tensor].shape

    def floats(self, tensor: str) -> np.ndarray:
        info = self.infos[tensor]
        return dequantize(info.raw(self.buf), info.type).astype(np.float64).ravel()


@dataclass(frozen=True)
class Arch:
    hf_class: str
    config: Callable[[FileView], dict]  # the family's config.json keys (the common ones are added by config())
    # GGUF block tensor -> HF module within a layer; a callable when it depends on the file (Falcon's norms)
    blocks: dict | Callable[[FileView], dict]
    layers: str = "model.layers"  # HF prefix of layer N
    globals: dict = field(default_factory=lambda: dict(LLAMA_GLOBALS))
    folded: frozenset = frozenset()  # tensors that are settings, folded into the config, not weights
    rows: Callable | None = None  # (hf_name, rows [out, ...], config) -> rows in HF order (arrays and blocks)
    # (hf_name, float array) -> the checkpoint's values; 1-D tensors (norms) only, which never stay in blocks
    values: Callable | None = None

    def hf_names(self, view: FileView) -> dict[str, str]:
        """GGUF tensor name -> HF name of every tensor in the file that is a weight."""
        blocks = self.blocks(view) if callable(self.blocks) else self.blocks
        names = {}
        for name in view.infos:
            if name in self.folded:
                continue
            base, _, suffix = name.rpartition(".")
            m = _BLOCK_NAME.fullmatch(name)
            if base in self.globals and suffix in ("weight", "bias"):
                names[name] = f"{self.globals[base]}.{suffix}"
            elif m and m.group(2) in blocks:
                names[name] = f"{self.layers}.{m.group(1)}.{blocks[m.group(2)]}.{m.group(3)}"
            else:
                raise UnsupportedModelError(f"{view.path}: unexpected tensor {name!r} for GGUF architecture "
                                            f"{view.arch!r}")
        return names


_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
LLAMA_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_BLOCKS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def config(view: FileView, arch: Arch) -> dict:
    """The HF config.json of the file: what every family has, then the family's own keys."""
    meta = view.meta
    return {
        "architectures": [arch.hf_class],
        "model_type": view.arch,
        # The embedding decides: a vocab list can be padded differently.
        "vocab_size": view.shape("token_embd.weight")[0],
        "tie_word_embeddings": not view.has("output.weight"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        **arch.config(view),
    }


# --- Llama and the families that share its config keys ------------------------------------------------


def _llama_config(view: FileView) -> dict:
    hidden, heads, layers = view.need("embedding_length", "attention.head_count", "block_count")
    config = {
        "hidden_size": hidden,
        "intermediate_size": view.get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": view.get("attention.head_count_kv", heads),
        "head_dim": view.get("attention.key_length", hidden // heads),
        "rms_norm_eps": view.get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": view.get("rope.freq_base", 10000.0),
        "max_position_embeddings": view.get("context_length"),
        "attention_bias": view.has("blk.0.attn_q.bias"),
        "hidden_act": "silu",
    }
    kind, factor = view.get("rope.scaling.type"), view.get("rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        config["rope_scaling"] = {"rope_type": kind, "factor": float(factor)}
        if view.get("rope.scaling.original_context_length"):
            config["rope_scaling"]["original_max_position_embeddings"] = view.get("rope.scaling.original_context_length")
    elif view.has("rope_freqs.weight"):
        config["rope_scaling"] = _llama3_rope_scaling(view, config["rope_theta"])
    return config


def _llama3_rope_scaling(view: FileView, theta: float) -> dict:
    # Llama 3.x files carry llama.cpp's per-frequency divisors instead of HF's parameters. Every
    # released Llama 3.x used low/high freq factors 1 and 4 over an 8192 context, so rebuild the
    # divisors from those and accept the file only if they match.
    divisors = view.floats("rope_freqs.weight")
    factor, low, high, old_ctx = float(divisors.max()), 1.0, 4.0, 8192
    dim = 2 * len(divisors)
    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2) / dim)
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    if not np.allclose(divisors, 1.0 / ((1 - smooth) / factor + smooth), rtol=1e-3):
        raise UnsupportedModelError(f"{view.path}: rope_freqs.weight does not match Llama 3 rope scaling")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old_ctx}


def _unpermute_qk(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    # llama.cpp did w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2); undo it.
    if not re.search(r"[qk]_proj\.(weight|bias)$", name):
        return w
    n_head = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- Phi-3 ------------------------------------------------------------------------------------------------

PHI3_BLOCKS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}  # ffn_up holds gate then up rows
LONGROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def _phi3_config(view: FileView) -> dict:
    config = _llama_config(view)
    rotary = view.get("rope.dimension_count")
    if rotary and rotary != config["head_dim"]:  # Phi-4-mini rotates part of each head
        config["partial_rotary_factor"] = rotary / config["head_dim"]
    # The converter writes 0 for "no window" (Phi-4); Phi-3-mini's window is real.
    config["sliding_window"] = view.get("attention.sliding_window") or None
    trained = view.get("rope.scaling.original_context_length")
    if trained:
        config["original_max_position_embeddings"] = trained
    if view.has(LONGROPE_TENSORS[0]) != view.has(LONGROPE_TENSORS[1]):
        raise ModelLoadError(f"{view.path}: a GGUF phi3 file needs both {' and '.join(LONGROPE_TENSORS)} or neither")
    if view.has(LONGROPE_TENSORS[0]):
        if not trained:
            raise ModelLoadError(f"{view.path}: LongRoPE factors without {view.arch}.rope.scaling.original_context_length")
        long, short = (view.floats(t).tolist() for t in LONGROPE_TENSORS)
        config["rope_scaling"] = {"rope_type": "longrope", "long_factor": long, "short_factor": short,
                                  "original_max_position_embeddings": trained}
        attention = view.get("rope.scaling.attn_factor")
        if attention is not None:  # what the converter computed from the two lengths; HF computes the same
            config["rope_scaling"]["attention_factor"] = float(attention)
    return config


# --- Gemma 2 and 3 -----------------------------------------------------------------------------------------

GEMMA_BLOCKS = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA3_BLOCKS = {**GEMMA_BLOCKS, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# llama.cpp's fixed settings (llama-model.cpp, load_hparams): every `pattern`-th layer is global; the 27B
# models (known by their layer count) scale queries by hidden / heads, the others by the head size.
GEMMA_FIXED = {"gemma2": {"pattern": 2, "layers_27b": 46}, "gemma3": {"pattern": 6, "layers_27b": 62}}
GEMMA3_LOCAL_THETA = 10000.0
SLIDING, FULL = "sliding_attention", "full_attention"


def _gemma_config(view: FileView) -> dict:
    config = _llama_config(view)
    fixed = GEMMA_FIXED[view.arch]
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    config["query_pre_attn_scalar"] = hidden // heads if layers == fixed["layers_27b"] else config["head_dim"]
    config["hidden_activation"] = config["hidden_act"] = "gelu_pytorch_tanh"
    window, pattern = view.get("attention.sliding_window"), fixed["pattern"]
    kinds = [SLIDING if i % pattern < pattern - 1 else FULL for i in range(layers)]
    if window is None:  # Gemma 3 without a window (its converter leaves it out): every layer global
        kinds = [FULL] * layers
    config.update(sliding_window=window, layer_types=kinds)
    if view.arch == "gemma2":
        # llama.cpp's defaults where the keys are missing; transformers' are the same
        config["attn_logit_softcapping"] = view.get("attn_logit_softcapping", 50.0)
        config["final_logit_softcapping"] = view.get("final_logit_softcapping", 30.0)
    else:
        config["attn_logit_softcapping"] = None
        config["final_logit_softcapping"] = view.get("final_logit_softcapping")
        config["rope_local_base_freq"] = GEMMA3_LOCAL_THETA
    return config


def _gemma_norms(name: str, w: np.ndarray) -> np.ndarray:
    return w - np.float32(1.0) if name.endswith("norm.weight") else w


# --- Falcon ------------------------------------------------------------------------------------------------


def _falcon_blocks(view: FileView) -> dict:
    two_norms = view.has("blk.0.attn_norm_2.weight")  # Falcon-40B/180B: attn_norm is the MLP's (ln_mlp)
    return {"attn_norm": "ln_mlp" if two_norms else "input_layernorm", "attn_norm_2": "ln_attn",
            "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
            "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}


def _falcon_config(view: FileView) -> dict:
    hidden, heads, layers = view.need("embedding_length", "attention.head_count", "block_count")
    kv = view.get("attention.head_count_kv", heads)
    two_norms = view.has("blk.0.attn_norm_2.weight")
    # llama.cpp's falcon is Falcon-7B (multi-query, one norm), or the new decoder: grouped key/value heads
    # with two norms (40B/180B) or one (Falcon2-11B). It has no ALiBi (Falcon-RW).
    new = two_norms or kv > 1
    return {
        "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers, "num_kv_heads": kv,
        "new_decoder_architecture": new, "multi_query": kv == 1, "parallel_attn": True,
        "num_ln_in_parallel_attn": 2 if two_norms else 1,
        "layer_norm_epsilon": view.get("attention.layer_norm_epsilon", 1e-5),
        "bias": view.has("blk.0.attn_qkv.bias"), "alibi": False,
        # the converter writes 4 * hidden whatever the checkpoint had; the tensor says
        "ffn_hidden_size": view.shape("blk.0.ffn_down.weight")[-1],
        "rope_theta": view.get("rope.freq_base", 10000.0),
        "max_position_embeddings": view.get("context_length", 2048),
        "activation": "gelu",
    }


def _falcon_qkv(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """Rows [all queries; all keys; all values] -> per key/value head: its queries, its key, its value."""
    if "query_key_value" not in name:
        return w
    H, KVH = config["num_attention_heads"], config["num_kv_heads"]
    D = w.shape[0] // (H + 2 * KVH)
    q = w[:H * D].reshape(KVH, H // KVH, D, *w.shape[1:])
    k = w[H * D:(H + KVH) * D].reshape(KVH, 1, D, *w.shape[1:])
    v = w[(H + KVH) * D:].reshape(KVH, 1, D, *w.shape[1:])
    return np.concatenate((q, k, v), axis=1).reshape(w.shape)


# --- MPT ---------------------------------------------------------------------------------------------------

MPT_BLOCKS = {"attn_norm": "norm_1", "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj", "ffn_norm": "norm_2",
              "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj",
              # not supported by keel's MPT, named so that its config refuses them with the reason
              "attn_q_norm": "attn.q_ln", "attn_k_norm": "attn.k_ln"}


def _mpt_config(view: FileView) -> dict:
    hidden, heads, layers = view.need("embedding_length", "attention.head_count", "block_count")
    kv = view.get("attention.head_count_kv", heads)
    max_bias = view.get("attention.max_alibi_bias", 0.0)
    inter = view.shape("blk.0.ffn_down.weight")[-1]  # the converter writes 4 * hidden whatever the checkpoint had
    attn = {"alibi": max_bias > 0, "alibi_bias_max": max_bias or 8, "clip_qkv": view.get("attention.clamp_kqv"),
            "qk_ln": view.has("blk.0.attn_q_norm.weight")}
    if kv != heads:  # MosaicML's grouped-query attention, which keel's MPT refuses by this name
        attn.update(attn_type="grouped_query_attention", kv_n_heads=kv)
    return {
        "d_model": hidden, "n_heads": heads, "n_layers": layers,
        "expansion_ratio": inter // hidden if inter % hidden == 0 else inter / hidden,
        "max_seq_len": view.get("context_length", 2048),
        "layer_norm_epsilon": view.get("attention.layer_norm_epsilon", 1e-5),
        "no_bias": not view.has("blk.0.attn_qkv.bias"),
        "attn_config": attn,
    }


TRANSFORMER_GLOBALS = {"output": "lm_head"}

ARCHITECTURES = {
    "llama": Arch("LlamaForCausalLM", _llama_config, LLAMA_BLOCKS, folded=frozenset({"rope_freqs.weight"}),
                  rows=_unpermute_qk),
    "mistral": Arch("MistralForCausalLM", _llama_config, LLAMA_BLOCKS, folded=frozenset({"rope_freqs.weight"}),
                    rows=_unpermute_qk),
    "qwen2": Arch("Qwen2ForCausalLM", _llama_config, LLAMA_BLOCKS),
    "qwen3": Arch("Qwen3ForCausalLM", _llama_config, LLAMA_BLOCKS),
    "phi3": Arch("Phi3ForCausalLM", _phi3_config, PHI3_BLOCKS, folded=frozenset(LONGROPE_TENSORS)),
    "gemma2": Arch("Gemma2ForCausalLM", _gemma_config, GEMMA_BLOCKS, values=_gemma_norms),
    "gemma3": Arch("Gemma3ForCausalLM", _gemma_config, GEMMA3_BLOCKS, values=_gemma_norms),
    "falcon": Arch("FalconForCausalLM", _falcon_config, _falcon_blocks, layers="transformer.h",
                   globals={**TRANSFORMER_GLOBALS, "token_embd": "transformer.word_embeddings",
                            "output_norm": "transformer.ln_f"}, rows=_falcon_qkv),
    "mpt": Arch("MptForCausalLM", _mpt_config, MPT_BLOCKS, layers="transformer.blocks",
                globals={**TRANSFORMER_GLOBALS, "token_embd": "transformer.wte", "output_norm": "transformer.norm_f",
                         "position_embd": "transformer.wpe"}),
}
