"""Quantization: quality and speed on the built-in model, and the kernel measurements behind keel/quant.

    .venv/bin/python -m bench.quant [--out bench/results/quant.md] [--rounds 3] [--threads N]
                                    [--skip-ppl] [--skip-kernels] [--skip-model]

Model part, one run: perplexity on bench/data/quant_text.txt (an essay written for this benchmark, 2,276
tokens) and greedy decode tokens/s at batch 1 and 16, for the model unquantized in float32 (this machine's
default dtype) and in bfloat16, and quantized with float32 activations: int8, int4 (group 32: the GGUF
file's Q4_1 blocks as they are, the head dense) and int4 group 64 (requantized); and "gguf blocks", the
default for GGUF files on a CPU with keel's kernels (Q4_1 projections and the Q8_0 embedding/head as
they are: the file's weights exactly). Ratios are against bfloat16 (the issue's
baseline) and float32, measured in the same run. The built-in model's weights are Q4_1 already: "bf16"
here means those weights dequantized, so int4 group 32 holds exactly them.

Kernel part: microseconds per call of each candidate matmul at SmolLM2's projection shapes, and where
dequantize-then-matmul overtakes the kernels as rows grow (the row limits in keel/quant/int8.py, int4.py).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from bench.decode import REPEAT, bench_keel, machine

TEXT = os.path.join(os.path.dirname(__file__), "data", "quant_text.txt")
CONFIGS = [  # label, dtype, quantization. Dtypes pinned, so that rows compare on any CPU
    ("float32", "float32", "none"),  # the file dequantized, keel's "auto" dtype on a CPU without bf16 instructions
    ("bf16", "bfloat16", "none"),
    ("gguf blocks", "float32", "gguf"),  # keel's default for the file on such a CPU: Q4_1 and Q8_0 as they are
    ("int8", "float32", "int8"),
    ("int4 g32", "float32", "int4"),
    ("int4 g64", "float32", ("int4", 64)),
]


# --- model --------------------------------------------------------------------------------------


@torch.inference_mode()
def perplexity(llm, ids: list[int], chunk: int = 512) -> float:
    """exp(mean NLL of each token given those before it), fed through the model in prefill chunks as
    the engine would, reading the KV cache it wrote for the earlier chunks."""
    from keel.layers.attention import AttentionMetadata
    eng = llm.engine
    bs = eng.cache_config.block_size
    table = list(range(-(-len(ids) // bs)))
    if len(table) > eng.num_blocks:
        raise SystemExit(f"the text needs {len(table)} KV blocks, the engine has {eng.num_blocks}")
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids))
        meta = AttentionMetadata.build([end - start], [end], [table], bs, eng.device)
        x = torch.tensor(ids[start:end], device=eng.device)
        hidden = eng.model(x, torch.arange(start, end, device=eng.device), meta)
        logits = eng.model.compute_logits(hidden[: len(ids) - 1 - start])
        target = torch.tensor(ids[start + 1: end + 1], device=eng.device)
        nll += F.cross_entropy(logits[: len(target)], target, reduction="sum").item()
        count += len(target)
    return math.exp(nll / count)


def bench_model(new_tokens: int, rounds: int, with_ppl: bool = True) -> list[str]:
    """All configurations loaded at once; perplexity of each (deterministic), then `rounds` rounds that
    time every configuration in turn, keeping each one's best: other processes share these cores, and
    interleaving gives every configuration the same chance at the quiet moments."""
    from keel import LLM
    from keel.quant import QuantConfig
    with open(TEXT) as f:
        text = f.read()
    llms, rows = {}, {}
    for label, dtype, quant in CONFIGS:
        q = QuantConfig(*quant) if isinstance(quant, tuple) else quant
        llm = llms[label] = LLM(dtype=dtype, quantization=q, max_model_len=2560, kv_cache_memory_gb=0.5)
        ids = llm.tokenizer.encode(text)
        rows[label] = {"dtype": str(llm.engine.dtype).replace("torch.", ""),
                       "ppl": perplexity(llm, ids) if with_ppl else float("nan"),
                       "bytes": llm.engine.weight_bytes(), "tokens": len(ids), 1: 0.0, 16: 0.0}
        print(label, rows[label]["dtype"], f"ppl {rows[label]['ppl']:.4f}", flush=True)
    for r in range(rounds):
        for label, llm in llms.items():
            for b in (1, 16):
                rows[label][b] = max(rows[label][b], bench_keel(llm, b, new_tokens))
        print(f"round {r + 1}:", {k: (round(v[1], 1), round(v[16], 1)) for k, v in rows.items()}, flush=True)
    default_dtype = "float32"
    base, dflt = rows["bf16"], rows["float32"]
    out = [f"Built-in model SmolLM2-135M-Instruct (GGUF Q4_1). Perplexity over {base['tokens']} tokens of "
           f"bench/data/quant_text.txt; greedy decode of {new_tokens} new tokens after a short prompt, tok/s the best "
           f"of {rounds} interleaved rounds x {REPEAT} runs.", "",
           f"| config | activations | perplexity | vs bf16 | tok/s b=1 | tok/s b=16 | b=1 vs bf16 | b=1 vs "
           f"{default_dtype} | b=16 vs bf16 | b=16 vs {default_dtype} | projections MB | all weights MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        out.append(f"| {label} | {row['dtype']} | {row['ppl']:.3f} | {100 * (row['ppl'] / base['ppl'] - 1):+.2f}% | "
                   f"{row[1]:.1f} | {row[16]:.1f} | {row[1] / base[1]:.2f}x | {row[1] / dflt[1]:.2f}x | "
                   f"{row[16] / base[16]:.2f}x | {row[16] / dflt[16]:.2f}x | "
                   f"{row['bytes']['projections'] / 1e6:.1f} | {row['bytes']['total'] / 1e6:.1f} |")
    return out


# --- kernels ------------------------------------------------------------------------------------


def timeit(f, repeat: int = 10) -> float:
    """Best of 5 x `repeat` calls, in microseconds (other processes share these cores: the best is
    the least disturbed)."""
    for _ in range(2):
        f()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeat):
            f()
        best = min(best, (time.perf_counter() - t) / repeat)
    return best * 1e6


def _layers(w: torch.Tensor, dtype: torch.dtype, own: bool = False):
    """Quantized layers over w, prepared with PyTorch's CPU operators (own=False) or keel's kernels."""
    import keel.quant.int4 as int4
    import keel.quant.int8 as int8
    saved = int8.kernels, int4.kernels
    if not own:
        int8.kernels = int4.kernels = lambda: None
    try:
        return _make_layers(w, dtype, int8.Int8Linear, int4.Int4Linear)
    finally:
        int8.kernels, int4.kernels = saved


def _make_layers(w, dtype, Int8Linear, Int4Linear):
    out = {}
    for key, cls, g in (("int8", Int8Linear, None), ("int4 g32", Int4Linear, 32), ("int4 g64", Int4Linear, 64),
                        ("int4 g128", Int4Linear, 128)):
        if g and w.shape[1] % g:
            continue
        layer = cls(w.shape[1], w.shape[0], dtype=dtype, group_size=g)
        for name, t in cls.quantize(w, g).items():
            getattr(layer, name).data.copy_(t)
        layer.prepare()
        out[key] = layer
    return out


SHAPES = [(960, 576, "qkv"), (576, 576, "o"), (3072, 576, "gate_up"), (576, 1536, "down"), (49152, 576, "head")]


def bench_kernels() -> list[str]:
    lp = torch.ops.mkldnn._linear_pointwise
    out = ["Microseconds per call, best of 5 x 10. fp32 oneDNN: the packed float32 layer keel runs by default; "
           "int8 / int4: the CPU kernel with bfloat16 activations, as keel calls it (a float32 model casts "
           "x to bf16 and back); 'fp32 x': the same kernel given float32 activations; "
           "deq: dequantize-then-matmul in float32 (the reference path).", "",
           "| layer (out x in) | rows | fp32 oneDNN | bf16 F.linear | int8 | int8 fp32 x | int4 g32 | int4 g64 | "
           "int4 g128 | int4 g32 fp32 x | deq int8 | deq int4 g32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, k, name in SHAPES:
        w = torch.randn(n, k) / k ** 0.5
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        wb = w.bfloat16()
        q = _layers(w, torch.float32)
        for m in (1, 16):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            cells = [timeit(lambda: lp(x, packed, None, "none", [], "")), timeit(lambda: F.linear(xb, wb)),
                     timeit(lambda: q["int8"].fast(x)),
                     timeit(lambda: torch._weight_int8pack_mm(x, q["int8"].qweight, q["int8"].scales))]
            for key in ("int4 g32", "int4 g64", "int4 g128"):
                cells.append(timeit(lambda: q[key].fast(x)) if key in q else None)
            i4 = q["int4 g32"]
            sz32 = i4.kernel_sz.float()
            cells.append(timeit(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, i4.cpu_packed, 32, sz32)))
            cells += [timeit(lambda: F.linear(x, q["int8"].dequantize(torch.float32))),
                      timeit(lambda: F.linear(x, i4.dequantize(torch.float32)))]
            out.append(f"| {name} ({n}x{k}) | {m} | " + " | ".join("-" if c is None else f"{c:.0f}" for c in cells) + " |")

    out += ["", "Where dequantize-then-matmul overtakes the kernels for a float32 model, gate_up (3072x576), "
            "microseconds:", "",
            "| rows | fp32 oneDNN | int8 kernel | int8 deq + F.linear | int4 g32 kernel | int4 g32 deq + F.linear |",
            "|---|---|---|---|---|---|"]
    w = torch.randn(3072, 576) / 24
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
    q = _layers(w, torch.float32)
    for m in (4, 8, 16, 32, 64, 128, 256, 512):
        x = torch.randn(m, 576)
        r = 3 if m >= 128 else 10
        cells = [timeit(lambda: lp(x, packed, None, "none", [], ""), r), timeit(lambda: q["int8"].fast(x), r),
                 timeit(lambda: F.linear(x, q["int8"].dequantize(torch.float32)), r),
                 timeit(lambda: q["int4 g32"].fast(x), r),
                 timeit(lambda: F.linear(x, q["int4 g32"].dequantize(torch.float32)), r)]
        out.append(f"| {m} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-ppl", action="store_true", help="decode speed only (perplexity takes minutes)")
    args = ap.parse_args()
    rows = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}", ""]
    if not args.skip_model:
        rows += bench_model(args.new_tokens, args.rounds, not args.skip_ppl) + [""]
    if not args.skip_kernels:
        rows += bench_kernels()
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# bench/quant.py\n\n" + text + "\n")


if __name__ == "__main__":
    main()
