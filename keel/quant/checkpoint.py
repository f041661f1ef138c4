"""`keel quantize`: write a quantized copy of a checkpoint that keel loads straight into quantized layers.

The folder holds what a Hugging Face folder holds (config.json, tokenizer files) plus safetensors whose
projection weights are replaced by their quantized tensors (`X.weight` -> `X.qweight`, `X.scales`,
`X.zeros` for int4), and quantization_config.json saying which format. The tensors are the ones that
quantizing at load produces (keel.quant.convert.quantized_tensors), so both give the same outputs bit
for bit. One weight is quantized at a time; a shard's worth of quantized tensors is held before writing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from keel.errors import InvalidRequestError, ModelLoadError
from keel.models.loader import DEFAULT_MODEL_NAME, open_checkpoint, resolve_model
from keel.models.registry import model_class
from keel.quant.config import CONFIG_FILE, QuantConfig
from keel.quant.convert import quantize_model, quantized_tensors
from keel.quant.gguf_blocks import DIRECT_TYPES

MAX_SHARD_BYTES = 2 << 30
# Files of a model folder that describe the model but hold no weights: copied as they are.
_SIDE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
_NOT_COPIED = ("model.safetensors.index.json", CONFIG_FILE)


def quantize_checkpoint(model: str | None, out: str, cfg: QuantConfig,
                        max_shard_bytes: int = MAX_SHARD_BYTES, keep_embeddings: bool = False) -> dict:
    """Quantize `model` (a folder, GGUF file, hub id or None for the built-in model) into folder `out`.
    keep_embeddings: keep the embedding (and head) in full precision even where the source stored them
    quantized (see _embeddings_as_in_source). Returns a summary: the files written, the bytes of
    tensors, the config used and a note on the embeddings."""
    if model == DEFAULT_MODEL_NAME and not os.path.exists(model):
        model = None
    path = resolve_model(model)
    ckpt = open_checkpoint(path)
    if ckpt.quantization is not None:
        raise ModelLoadError(f"{path} is already quantized ({ckpt.quantization.describe()}); quantize the "
                             "original checkpoint instead")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InvalidRequestError(f"{out} already exists and is not an empty folder; name a new folder")
    ckpt.config.check()
    cfg, note = _embeddings_as_in_source(cfg, ckpt, keep_embeddings)
    # The model's structure says which tensors are projections; on the meta device it holds no memory.
    skeleton = model_class(ckpt.config.architecture)(ckpt.config, 1, torch.float32, torch.device("meta"))
    quantize_model(skeleton, cfg)
    source = ckpt.block_tensors(DIRECT_TYPES) if ckpt.block_tensors is not None else ckpt.tensors()

    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        files, total = _write_shards(quantized_tensors(skeleton, source), partial, max_shard_bytes)
        if os.path.isdir(path):
            _copy_side_files(path, partial)
        else:
            _write_gguf_side_files(path, partial)
        cfg.write(partial)
        _normal_modes(partial)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"files": files, "tensor_bytes": total, "source": path, "config": cfg, "note": note}


def _embeddings_as_in_source(cfg: QuantConfig, ckpt, keep: bool) -> tuple[QuantConfig, str | None]:
    """A GGUF file usually stores the token embedding quantized (Q8_0 in the built-in model). Written
    back in full precision it would make the "quantized" copy larger than the file it came from, so
    the embedding (and a tied head) is quantized too unless the caller keeps it."""
    if cfg.quantize_embeddings or not ckpt.tensor_types:
        return cfg, None
    from gguf import GGMLQuantizationType as Q
    kind = ckpt.tensor_types.get("model.embed_tokens.weight")
    if kind is None or kind in (Q.F32, Q.F16, Q.BF16):
        return cfg, None
    if keep:
        return cfg, f"the embedding stays in full precision (--keep-embeddings), though the source stored it as {kind.name}"
    return (dataclasses.replace(cfg, quantize_embeddings=True),
            f"the embedding is quantized too: the source stored it as {kind.name} (--keep-embeddings keeps it whole)")


def _normal_modes(folder: str) -> None:
    """Files readable as any file this user writes (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _write_shards(tensors, folder: str, max_bytes: int) -> tuple[list[str], int]:
    from safetensors.torch import save_file
    shards, current, size, total = [], {}, 0, 0
    weight_map: dict[str, int] = {}

    def flush():
        nonlocal current, size
        if current:
            name = f"shard-{len(shards)}.safetensors"
            save_file(current, os.path.join(folder, name), metadata={"format": "pt"})
            shards.append(name)
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            flush()
        current[name] = tensor.contiguous()
        weight_map[name] = len(shards)
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        final = ["model.safetensors"]
    else:
        final = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for tmp, name in zip(shards, final):
        os.rename(os.path.join(folder, tmp), os.path.join(folder, name))
    if len(final) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: final[i] for n, i in weight_map.items()}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return final, total


def _copy_side_files(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if os.path.isfile(full) and name.endswith(_SIDE_SUFFIXES) and name not in _NOT_COPIED:
            shutil.copy2(full, os.path.join(dst, name))


def _write_gguf_side_files(path: str, dst: str) -> None:
    """A GGUF file carries its config and tokenizer inside: write them out as a Hugging Face folder has them."""
    from keel.models.gguf import read_gguf
    g = read_gguf(path)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(g.config, f, indent=2)
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": g.config.get("bos_token_id"), "eos_token_id": g.eos_token_ids}, f, indent=2)
    g.tokenizer.save(os.path.join(dst, "tokenizer.json"))
    # bos, where the file adds one, is in tokenizer.json's post-processor already
    tok_cfg = {"bos_token": g.bos_token, "eos_token": g.eos_token, "add_bos_token": False}
    if g.chat_template:
        tok_cfg["chat_template"] = g.chat_template
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
