"""What to quantize and how: the one dataclass of this concern, and its file in a quantized checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from keel.errors import InvalidRequestError, ModelLoadError

METHODS = ("int8", "int4")  # what `keel quantize` writes
# what a model loads with: also "gguf", a GGUF file's own block formats kept (Q4_0/Q4_1 as int4, Q8_0 as
# int8, groups of 32; the default for such files where keel's CPU kernels run), and "none" (dequantized)
LOAD_METHODS = METHODS + ("gguf", "none")
INT4_GROUP_SIZES = (32, 64, 128)
# Group 32 by measurement (bench/quant.py, bench/results/quant.md): the CPU int4 kernel costs the same
# at groups 32 and 64, group 32 quantizes more finely, divides more layer widths (SmolLM2's 576 is no
# multiple of 128, the tiny test models' 96 no multiple of 64), and is the block size of GGUF's
# Q4_0/Q4_1, which then load without requantizing (the built-in model keeps its perplexity exactly).
# Its scale and zero add 4 bytes per 32 weights.
DEFAULT_INT4_GROUP_SIZE = 32
CONFIG_FILE = "quantization_config.json"
FORMAT = "keel"
FORMAT_VERSION = 1


@dataclass
class QuantConfig:
    method: str
    """int8 (one scale per output channel) or int4 (a scale and zero point per group of input channels)."""
    group_size: int | None = None
    """int4 only: input channels per scale and zero point, 32, 64 or 128 (None: 32)."""
    quantize_embeddings: bool = False
    """Also quantize the token embedding and the output head (by default they stay in the model dtype)."""
    embedding_method: str | None = None
    """With quantize_embeddings: the embedding's and head's format, int8 by default whatever `method` is
    (as llama.cpp's 4-bit files keep them at 6-8 bits: int4 there turns the built-in model's "Paris"
    into "L'Étoile"); None without quantize_embeddings."""

    def __post_init__(self) -> None:
        if not self.quantize_embeddings:
            self.embedding_method = None
        elif self.embedding_method is None:
            self.embedding_method = "int8"
        elif self.embedding_method not in METHODS:
            raise InvalidRequestError(f"embedding_method={self.embedding_method!r} is invalid: use int8 or int4")
        if self.method not in METHODS + ("gguf",):
            raise InvalidRequestError(f"quantization={self.method!r} is invalid: use one of {', '.join(LOAD_METHODS)}")
        if self.method == "gguf":
            if self.group_size is not None or self.quantize_embeddings:
                raise InvalidRequestError("quantization='gguf' keeps a GGUF file's own formats: it takes no "
                                          "group size and covers the embedding already")
        elif self.method == "int8":
            if self.group_size is not None:
                raise InvalidRequestError(f"group_size={self.group_size!r} is invalid: int8 has one scale per "
                                          "output channel, no groups")
        elif self.group_size is None:
            self.group_size = DEFAULT_INT4_GROUP_SIZE
        elif self.group_size not in INT4_GROUP_SIZES:
            raise InvalidRequestError(f"group_size={self.group_size!r} is invalid: use one of "
                                      f"{', '.join(map(str, INT4_GROUP_SIZES))}")

    def describe(self) -> str:
        if self.method == "gguf":
            return "GGUF blocks kept (Q4_0/Q4_1 as int4, Q8_0 as int8, groups of 32)"
        text = self.method if self.method == "int8" else f"int4, group size {self.group_size}"
        return text + (f", embedding and head {self.embedding_method}" if self.quantize_embeddings else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["embedding_method"] is None:
            del d["embedding_method"]
        return {"quant_method": FORMAT, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "QuantConfig":
        if d.get("quant_method") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(f"{where}: not a keel quantization config of format version {FORMAT_VERSION} "
                                 f"(quant_method={d.get('quant_method')!r}, format_version={d.get('format_version')!r})")
        try:
            # files written before embedding_method existed quantized the embedding with `method`
            return cls(d["method"], d.get("group_size"), bool(d.get("quantize_embeddings", False)),
                       d.get("embedding_method", d["method"]))
        except KeyError:
            raise ModelLoadError(f"{where} names no quantization method") from None
        except InvalidRequestError as e:
            raise ModelLoadError(f"{where}: {e}") from None

    def write(self, folder: str) -> None:
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def read_quant_config(folder: str) -> QuantConfig | None:
    """The quantization of a checkpoint folder written by `keel quantize`, or None for a plain one."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return QuantConfig.from_dict(d, path)


def parse_quantization(value, group_size: int | None = None) -> QuantConfig | None:
    """A QuantConfig from what a user passes: None, "none", "int8", "int4", "gguf" or a QuantConfig."""
    if value is None or isinstance(value, QuantConfig):
        if group_size is not None:
            raise InvalidRequestError("group_size is given without a quantization method")
        return value
    if not isinstance(value, str):
        raise InvalidRequestError(f"quantization={value!r} is invalid: use one of {', '.join(LOAD_METHODS)}")
    if value.lower() == "none":
        if group_size is not None:
            raise InvalidRequestError("group_size is given with quantization='none'")
        return None
    return QuantConfig(value.lower(), group_size)


def resolve(checkpoint_quant: QuantConfig | None, requested: QuantConfig | None, where: str) -> QuantConfig | None:
    """The quantization a model is built with: a quantized checkpoint's own, unless the user asked for
    another, which is an error (its weights cannot be requantized without the originals)."""
    if checkpoint_quant is None:
        return requested
    if requested is not None and requested != checkpoint_quant:
        raise ModelLoadError(f"{where} is already quantized ({checkpoint_quant.describe()}); it cannot be "
                             f"quantized again as {requested.describe()}: quantize the original checkpoint instead")
    return checkpoint_quant
