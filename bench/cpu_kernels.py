"""keel's CPU kernels (keel/kernels) against PyTorch's, as a decode step meets them: weights cold.

    .venv/bin/python -m bench.cpu_kernels [--out bench/results/cpu_kernels.md] [--layers 30]

A decode step reads every layer's weights once, so a kernel measured on one hot weight (in cache) says
little. Here each method runs over --layers distinct copies of SmolLM2's gate_up projection (3072x576,
212 MB in float32 for 30 layers, well over any L3), one call per layer per pass; microseconds per layer,
best of 5 passes, for 1 to 256 activation rows. The row counts where keel's kernels stop winning are
the thresholds in keel/quant/int8.py, int4.py and keel/layers/linear.py. keel's matmul
(keel/kernels/cpu_gemm.c) runs every format: float32, bfloat16, int8 per channel, int8 with groups of
32 (GGUF Q8_0), int4 with groups of 32 (GGUF Q4_0/Q4_1; float16 scales and zeros as the file has them).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.decode import machine
from bench.quant import _layers
from keel.kernels.cpu import W_BF16, W_F32, W_INT4, W_INT8G, kernels

N, K = 3072, 576
ROWS = (1, 2, 4, 8, 16, 32, 64, 256)


def per_layer_us(fn, inputs, passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        for arg in inputs:
            fn(arg)
        best = min(best, (time.perf_counter() - t) / len(inputs))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    own = kernels()
    if own is None:
        raise SystemExit("keel's CPU kernels cannot run here")
    torch.manual_seed(0)
    ws = [torch.randn(N, K) / K ** 0.5 for _ in range(args.layers)]
    lp = torch.ops.mkldnn._linear_pointwise
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in ws]
    bf16 = [w.bfloat16() for w in ws]
    theirs = [_layers(w, torch.float32, own=False) for w in ws]
    ours = [_layers(w, torch.float32, own=True) for w in ws]
    for q in ours:  # int4 with float16 scales and zeros, as a GGUF file's Q4_1 blocks load
        q["int4 g32"].scales.data, q["int4 g32"].zeros.data = q["int4 g32"].scales.half(), q["int4 g32"].zeros.half()
    from keel.quant.int8 import quantize_int8
    grouped = [quantize_int8(w, 32) for w in ws]
    cols = ["fp32 oneDNN", "keel fp32", "bf16 F.linear", "keel bf16", "torch int8", "keel int8", "keel int8 g32",
            "torch int4 g32", "keel int4 g32"]
    lines = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}",
             f"{args.layers} distinct {N}x{K} weights, microseconds per layer (weights cold), best of 5 passes. "
             "torch int8/int4: PyTorch's operators as keel used to call them for a float32 model (activations "
             "cast to bfloat16); keel: keel/kernels/cpu_gemm.c, float32 activations.", "",
             "| rows | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in ROWS:
        x = torch.randn(m, K)
        xb = x.bfloat16()
        i4 = "int4 g32"
        cells = [
            per_layer_us(lambda p: lp(x, p, None, "none", [], ""), packed),
            per_layer_us(lambda w: own.gemm(x, W_F32, w), ws),
            per_layer_us(lambda w: F.linear(xb, w), bf16),
            per_layer_us(lambda w: own.gemm(x, W_BF16, w), bf16),
            per_layer_us(lambda q: q["int8"]._cpu_int8(x), theirs),
            per_layer_us(lambda q: own.gemm(x, W_INT8G, q["int8"].qweight, q["int8"].scales, group=K), ours),
            per_layer_us(lambda q: own.gemm(x, W_INT8G, q["qweight"], q["scales"], group=32), grouped),
            per_layer_us(lambda q: q[i4]._cpu_int4(x), theirs),
            per_layer_us(lambda q: own.gemm(x, W_INT4, q[i4].qweight, q[i4].scales, q[i4].zeros, 32), ours),
        ]
        lines.append(f"| {m} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# bench/cpu_kernels.py\n\n" + text + "\n")


if __name__ == "__main__":
    main()
