"""`keel quantize MODEL OUT --method int8|int4 [--group-size N]` (the quantization options of engine commands
come from keel.config.LoadConfig)."""

from __future__ import annotations

import argparse

from keel.errors import KeelError

from keel.quant.config import DEFAULT_INT4_GROUP_SIZE, INT4_GROUP_SIZES, METHODS

_GROUP_HELP = (f"int4 only: input channels per scale and zero point, one of "
               f"{', '.join(map(str, INT4_GROUP_SIZES))} (default {DEFAULT_INT4_GROUP_SIZE})")


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="write a quantized copy of a model that keel loads directly",
        description="Quantize a model's linear projections to int8 (one scale per output channel) or int4 "
                    "(a scale and zero point per group of input channels) and write the result as a model "
                    "folder (safetensors plus quantization_config.json). Load it like any model folder.")
    p.add_argument("model", metavar="MODEL",
                   help="model folder, GGUF file or hub id; SmolLM2-135M-Instruct names the built-in model")
    p.add_argument("out", metavar="OUT", help="folder to write; it must not exist or be empty")
    p.add_argument("--method", required=True, choices=METHODS, help="int8 or int4")
    p.add_argument("--group-size", type=int, default=None, help=_GROUP_HELP)
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize the token embedding and the output head (by default kept in full precision, "
                        "unless the source stored them quantized, as GGUF files do)")
    p.add_argument("--keep-embeddings", action="store_true",
                   help="keep the embedding and head in full precision even when the source stored them quantized")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args) -> int:
    from keel.quant.checkpoint import quantize_checkpoint
    from keel.quant.config import QuantConfig
    if args.quantize_embeddings and args.keep_embeddings:
        raise KeelError("--quantize-embeddings and --keep-embeddings contradict each other")
    cfg = QuantConfig(args.method, args.group_size, args.quantize_embeddings)
    summary = quantize_checkpoint(args.model, args.out, cfg, keep_embeddings=args.keep_embeddings)
    if summary["note"]:
        print(f"keel quantize: {summary['note']}")
    print(f"wrote {args.out}: {summary['config'].describe()}, {summary['tensor_bytes'] / 1e6:.1f} MB of tensors "
          f"in {len(summary['files'])} file(s), from {summary['source']}")
    return 0
