"""Read a GGUF file (llama.cpp's format) into a Hugging Face-style config, tokenizer and weights.

The rest of keel only knows Hugging Face checkpoints, so this module translates: GGUF metadata
becomes a config.json dict, the embedded vocabulary becomes a `tokenizers.Tokenizer` (gguf_tokenizer.py),
and GGUF tensor names, layouts and quantized types become HF names, [out, in] shapes and float32. What
differs per architecture (names, config keys, the converter's changes to tensors) is in gguf_arch.py.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from tokenizers import Tokenizer

from keel.errors import ModelLoadError, UnsupportedModelError
from keel.models.gguf_arch import ARCHITECTURES, Arch, FileView
from keel.models.gguf_arch import config as arch_config
from keel.models.gguf_tokenizer import gguf_tokenizer

# Types gguf.quants can dequantize; a name the installed gguf lacks is simply not accepted.
_SUPPORTED_TYPES = {getattr(GGMLQuantizationType, n) for n in
                    "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
                    if hasattr(GGMLQuantizationType, n)}


@dataclass
class GGUFCheckpoint:
    config: dict
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    path: str
    # (hf_name, tensor info) pairs, checked up front so that tensors() cannot fail halfway.
    _entries: list = field(default_factory=list, repr=False, compare=False)
    _buf: memoryview | None = field(default=None, repr=False, compare=False)  # the memmapped file
    _arch: Arch | None = field(default=None, repr=False, compare=False)

    def tensor_types(self) -> dict:
        """hf_name -> GGMLQuantizationType of every tensor."""
        return {name: info.type for name, info in self._entries}

    def tensors(self, keep_blocks=()) -> Iterator[tuple[str, "torch.Tensor | GGUFBlocks"]]:
        """Yield (hf_name, float32 tensor), reading and dequantizing each only when it is reached.
        A 2-D tensor of a type in `keep_blocks` comes as its GGUFBlocks instead (for keel.quant)."""
        for name, info in self._entries:
            if info.type in keep_blocks and len(info.shape) == 2:
                yield name, _to_blocks(info, self._buf, name, self.config, self._arch)
            else:
                yield name, _to_torch(info, self._buf, name, self.config, self._arch)


@dataclass
class GGUFBlocks:
    """A weight still in its GGUF block format, rows in HF order (e.g. q/k un-permuted): one row of
    `data` holds the blocks of one output row, `shape` is the dequantized [out, in]."""
    type: GGMLQuantizationType
    shape: tuple
    data: np.ndarray  # uint8 [out, bytes per row]

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(dequantize(self.data, self.type).astype(np.float32, copy=False).reshape(self.shape))


def read_gguf(path: str) -> GGUFCheckpoint:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path}" if not os.path.exists(path) else f"{path} is not a file")
    try:
        meta, infos, buf = _parse(path)
    except ModelLoadError:
        raise
    except Exception as e:  # struct/numpy/unicode errors from a damaged file
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from e

    name = meta.get("general.architecture")
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    for needed in ("token_embd.weight", "tokenizer.ggml.tokens"):
        if needed not in infos and needed not in meta:
            raise ModelLoadError(f"{path}: GGUF file has no {needed}")
    view = FileView(meta, infos, buf, name, path)
    entries = [(hf, infos[t]) for t, hf in arch.hf_names(view).items()]
    config = arch_config(view, arch)
    tokenizer, tokens = gguf_tokenizer(meta, name, path)
    bos_id, eos_id = config["bos_token_id"], config["eos_token_id"]
    # Chat models may end a turn with another token than eos (Llama 3's <|eot_id|>).
    eos_ids = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
               if f"tokenizer.ggml.{k}_token_id" in meta]
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
        _arch=arch,
    )


class _TensorInfo(NamedTuple):
    name: str
    shape: tuple  # HF order, outermost first
    type: GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int

    def raw(self, buf: memoryview) -> np.ndarray:
        """The bytes, one row per innermost dimension, as gguf.quants.dequantize expects them."""
        return np.frombuffer(buf, np.uint8, self.nbytes, self.offset).reshape(-1, self.nbytes // _rows(self.shape))


def _rows(shape: tuple) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64))


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9  # GGUF value type numbers


def _parse(path: str) -> tuple[dict, dict, memoryview]:
    # Not gguf.GGUFReader: it makes numpy views for every vocab string and takes ~3.5 s on this
    # 49k-token vocab (far more on Llama 3's 128k); struct over a memmap takes ~0.2 s.
    buf = memoryview(np.memmap(path, dtype=np.uint8, mode="r"))
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes)")
    pos = 4

    def read(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def read_str() -> str:
        nonlocal pos
        n = read("Q")
        if pos + n > len(buf):  # slicing would silently come up short
            raise ModelLoadError(f"{path} is truncated (it ends inside the metadata)")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    def read_value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _STRING:
            return read_str()
        if vtype != _ARRAY:
            return read(_SCALARS[vtype])
        etype, n = read("I"), read("Q")
        if etype in _SCALARS:  # token types and scores: one numpy call, not a struct call each
            dtype = np.dtype("<" + _SCALARS[etype])
            values = np.frombuffer(buf, dtype, n, pos).tolist()
            pos += n * dtype.itemsize
            return values
        return [read_value(etype) for _ in range(n)]

    version = read("I")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (a big-endian file?)")
    n_tensors, n_kv = read("Q"), read("Q")
    meta = {}
    for _ in range(n_kv):
        key = read_str()
        meta[key] = read_value(read("I"))
    raw = []
    for _ in range(n_tensors):
        name = read_str()
        dims = [read("Q") for _ in range(read("I"))]
        number = read("I")
        try:
            qtype = GGMLQuantizationType(number)
        except ValueError:  # newer than the installed gguf package
            raise UnsupportedModelError(f"{path}: tensor {name} has unknown type number {number}") from None
        if qtype not in _SUPPORTED_TYPES:
            raise UnsupportedModelError(f"{path}: tensor {name} has unsupported type {qtype.name}")
        raw.append((name, dims, qtype, read("Q")))

    align = meta.get("general.alignment", 32)
    data_start = -(-pos // align) * align
    infos = {}
    for name, dims, qtype, offset in raw:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise ModelLoadError(f"{path}: tensor {name} rows of {dims[0]} are not whole {qtype.name} blocks")
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * block_bytes
        if data_start + offset + nbytes > len(buf):
            # A file cut inside the tensor data still has a whole header; say so now, not mid-load.
            raise ModelLoadError(f"{path} is truncated: tensor {name} extends past the end of the file")
        # GGUF lists dimensions innermost first; HF wants [out, in].
        infos[name] = _TensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset, nbytes)
    return meta, infos, buf


def _to_torch(info: _TensorInfo, buf: memoryview, name: str, config: dict, arch: Arch) -> torch.Tensor:
    array = dequantize(info.raw(buf), info.type).astype(np.float32, copy=False).reshape(info.shape)
    if arch.rows is not None:
        array = arch.rows(name, array, config)
    if arch.values is not None:
        array = arch.values(name, array)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")  # F32 data is still a view of the read-only memmap
    return torch.from_numpy(array)


def _to_blocks(info: _TensorInfo, buf: memoryview, name: str, config: dict, arch: Arch) -> GGUFBlocks:
    raw = info.raw(buf)
    if arch.rows is not None:
        raw = arch.rows(name, raw, config)  # a block never spans rows: rows of blocks move as rows of numbers
    return GGUFBlocks(info.type, info.shape, np.array(raw, order="C"))
