"""Converters: a model's Linear layers into quantized ones, and a checkpoint's weights into their format."""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import nn

from keel.errors import ModelLoadError
from keel.layers.linear import Linear
from keel.models.gguf import GGUFBlocks
from keel.quant.config import DEFAULT_INT4_GROUP_SIZE, INT4_GROUP_SIZES, QuantConfig
from keel.quant.gguf_blocks import DIRECT_TYPES, GROUP, INT4_TYPES, INT8_TYPES, gguf_to_int4, gguf_to_int8
from keel.quant.int4 import Int4Embedding, Int4Linear
from keel.quant.int8 import Int8Embedding, Int8Linear
from keel.quant.layer import QuantLinear, TiedQuantHead

LAYERS = {"int8": (Int8Linear, Int8Embedding), "int4": (Int4Linear, Int4Embedding)}
EMBEDDING, HEAD = "model.embed_tokens", "lm_head"


def embedding_name(model: nn.Module) -> str:
    """The token embedding's module path: Llama's layout, or where the family keeps it (Falcon's, MPT's)."""
    return getattr(model, "embedding_name", EMBEDDING)


def quantize_model(model: nn.Module, cfg: QuantConfig, tensor_types: dict | None = None) -> None:
    """Swap every projection (each Linear but the output head) for the quantized layer of `cfg.method`,
    and with cfg.quantize_embeddings the embedding and output head too. Call it before loading weights:
    the dense layers are dropped unread, so full-precision weights are never held.
    method "gguf" (a GGUF file's own formats): each layer whose weights the file holds in Q4_0/Q4_1
    blocks becomes int4, in Q8_0 blocks int8, with groups of 32; tensor_types: name -> GGML type."""
    if cfg.method == "gguf":
        _quantize_as_gguf(model, tensor_types or {})
        return
    def layers(method: str):  # (linear class, embedding class, group size)
        return (*LAYERS[method], (cfg.group_size or DEFAULT_INT4_GROUP_SIZE) if method == "int4" else None)
    targets = [(name, m, layers(cfg.embedding_method if name == HEAD else cfg.method))
               for name, m in model.named_modules() if type(m) is Linear and (name != HEAD or cfg.quantize_embeddings)]
    emb = model.get_submodule(embedding_name(model)) if cfg.quantize_embeddings else None
    widths = {name: m.in_features for name, m, (_, _, group) in targets if group}
    if emb is not None and layers(cfg.embedding_method)[2]:
        widths[embedding_name(model)] = emb.embedding_dim
    if widths:
        _check_group_size(cfg.group_size or DEFAULT_INT4_GROUP_SIZE, widths)
    for name, m, (linear_cls, _, group) in targets:
        _replace(model, name, _quantized_like(m, linear_cls, group, name))
    if emb is not None:
        _, embedding_cls, group = layers(cfg.embedding_method)
        _quantize_embedding(model, emb, embedding_cls, group)


def _quantized_like(m: Linear, cls, group_size: int | None, name: str) -> QuantLinear:
    return cls(m.in_features, m.output_sizes or m.out_features, bias=m.bias is not None, dtype=m.weight.dtype,
               device=m.weight.device, group_size=group_size, name=name)


def _quantize_embedding(model: nn.Module, emb: nn.Embedding, cls, group_size: int | None) -> None:
    table = cls(emb.embedding_dim, emb.num_embeddings, dtype=emb.weight.dtype, device=emb.weight.device,
                group_size=group_size, name=embedding_name(model))
    _replace(model, embedding_name(model), table)
    if getattr(model, HEAD, None) is None:  # tied: the head computes with the embedding's tensors
        model.lm_head = TiedQuantHead(table)


def _quantize_as_gguf(model: nn.Module, tensor_types: dict) -> None:
    from keel.models.loader import checkpoint_target
    by_module: dict[str, set] = {}
    prefix = getattr(model, "checkpoint_prefix", "model.")  # as keel.models.loader.load_weights reads names
    for name, qtype in tensor_types.items():
        if not name.endswith(".weight"):
            continue
        if not name.startswith((prefix, "lm_head.")):
            name = prefix + name
        target, _ = checkpoint_target(model, name)
        by_module.setdefault(target[: -len(".weight")], set()).add(qtype)

    def kind(name: str, width: int):
        types = by_module.get(name, set())
        if width % GROUP or not types:
            return None
        if types <= set(INT4_TYPES):
            return "int4"
        return "int8" if types <= set(INT8_TYPES) else None  # mixed or other types: dequantized

    for name, m in [(n, m) for n, m in model.named_modules() if type(m) is Linear]:
        k = kind(name, m.in_features)
        if k is not None:
            _replace(model, name, _quantized_like(m, LAYERS[k][0], GROUP, name))
    emb = model.get_submodule(embedding_name(model))
    k = kind(embedding_name(model), emb.embedding_dim)
    if k is not None:
        _quantize_embedding(model, emb, LAYERS[k][1], GROUP)


def _check_group_size(group: int, widths: dict[str, int]) -> None:
    bad = [name for name, w in widths.items() if w % group]
    if not bad:
        return
    fits = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    advice = (f"group sizes that divide every layer: {', '.join(map(str, fits))}" if fits else
              f"none of the int4 group sizes {', '.join(map(str, INT4_GROUP_SIZES))} divides every layer; use int8")
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    raise ModelLoadError(f"int4 group size {group} does not divide the {widths[bad[0]]} input channels of "
                         f"{bad[0]}{more}; {advice}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def checkpoint_tensors(model: nn.Module, ckpt, cfg: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors to load into a model that quantize_model() has converted: a quantized checkpoint's
    as they are (checked against its config), any other's quantized on the way."""
    if ckpt.quantization is not None:
        return _checked(model, ckpt.tensors(), cfg, os.path.dirname(ckpt.files[0]))
    source = ckpt.block_tensors(DIRECT_TYPES) if ckpt.block_tensors is not None else ckpt.tensors()
    return quantized_tensors(model, source)


def quantized_tensors(model: nn.Module, tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """Each weight of a quantized layer turned into that layer's tensors (`X.weight` -> `X.qweight`,
    `X.scales`, ...), one at a time; the other tensors passed through, GGUF blocks dequantized. Loading
    these and loading what `keel quantize` wrote from them are the same thing, bit for bit."""
    from keel.models.loader import checkpoint_target
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, tensor in tensors:
        target, _ = checkpoint_target(model, name)
        module, _, suffix = target.rpartition(".")
        layer = layers.get(module)
        if layer is None or suffix != "weight":
            yield name, tensor.dequantize() if isinstance(tensor, GGUFBlocks) else tensor
            continue
        prefix = name[: -len("weight")]
        for tname, value in quantize_weight(layer, tensor, name).items():
            yield prefix + tname, value


def quantize_weight(layer: QuantLinear, weight, name: str) -> dict[str, torch.Tensor]:
    """One checkpoint weight (a float tensor or GGUF blocks) -> `layer`'s format."""
    if tuple(weight.shape[1:]) != (layer.in_features,):
        raise ModelLoadError(f"{name} has shape {tuple(weight.shape)}, the model expects {layer.in_features} "
                             "input channels")
    if isinstance(weight, GGUFBlocks):
        if layer.method == "int4" and layer.group_size == GROUP and weight.type in INT4_TYPES:
            return gguf_to_int4(weight)  # Q4_0/Q4_1 blocks are int4 groups of 32 already
        if layer.method == "int8" and layer.group_size == GROUP and weight.type in INT8_TYPES:
            return gguf_to_int8(weight)  # and Q8_0 blocks int8 groups of 32
        weight = weight.dequantize()
    return layer.quantize(weight, layer.group_size)


def _checked(model: nn.Module, tensors, cfg: QuantConfig, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A quantized checkpoint's tensors, with each one that does not fit its config named."""
    from keel.models.loader import checkpoint_target
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    quantized_names = {"qweight", "scales", "zeros"}
    for name, tensor in tensors:
        target, _ = checkpoint_target(model, name)
        module, _, suffix = target.rpartition(".")
        layer = layers.get(module)
        if layer is not None and suffix != "bias" and suffix not in layer.tensor_specs():
            raise ModelLoadError(f"{where}: {name} does not belong in a {layer.describe()} layer: the quantization "
                                 f"config ({cfg.describe()}) does not match the tensors")
        if layer is None and suffix in quantized_names:
            raise ModelLoadError(f"{where}: {name} is a quantized tensor, but the quantization config "
                                 f"({cfg.describe()}) leaves {module} unquantized: the config does not match the tensors")
        yield name, tensor


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights resident, by part: projections (the decoder's linear layers), embedding, head
    (an untied output head, or the packed copy of a tied one), other (norms); plus their total. A tensor
    shared by two parts is counted once."""
    parts = dict.fromkeys(("projections", "embedding", "head", "other"), 0)
    seen: set[int] = set()

    def add(part: str, tensors) -> None:
        for t in tensors:
            if t is None or t.numel() == 0 or t.device.type == "meta":
                continue
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                parts[part] += t.numel() * t.element_size()

    for name, m in model.named_modules():
        part = "embedding" if name == embedding_name(model) else "head" if name in (HEAD, "tied_head") else "projections"
        if isinstance(m, QuantLinear):
            add(part, m.resident_tensors() + [m.bias])
        elif isinstance(m, Linear):
            if m.weight.numel() == 0 or m.weight.data_ptr() not in seen:  # packed (opaque), or not seen
                seen.add(m.weight.data_ptr())
                parts[part] += m.weight_bytes()
            add(part, [m.bias])
        elif isinstance(m, nn.Embedding):
            add("embedding", [m.weight])
        else:
            add("other", m.parameters(recurse=False))
    parts["total"] = sum(parts.values())
    return parts
