"""The measurements behind two choices made at load time, on this machine, in one run:

1. the default dtype on a CPU (keel/engine/device.py): float32 against bfloat16 matmuls;
2. oneDNN-packed weights (keel/layers/linear.py Linear.pack_for_cpu) against F.linear.

    .venv/bin/python -m bench.kernels [--out bench/results/kernels.md]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.decode import machine

SHAPES = [(960, 576, "qkv"), (3072, 576, "gate_up"), (576, 1536, "down"), (49152, 576, "output head")]


def timeit(f, repeat: int = 20) -> float:
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeat):
            f()
        best = min(best, (time.perf_counter() - t) / repeat)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lp = torch.ops.mkldnn._linear_pointwise
    rows = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}", "",
            "Microseconds per call (best of 3 x 20), SmolLM2-135M projection shapes.", "",
            "| layer (out x in) | tokens | F.linear fp32 | F.linear bf16 | packed fp32 | packed / F.linear fp32 |",
            "|---|---|---|---|---|---|"]
    for out_f, in_f, name in SHAPES:
        w = torch.randn(out_f, in_f)
        wb = w.bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        for m in (1, 16):
            x = torch.randn(m, in_f)
            xb = x.bfloat16()
            a = timeit(lambda: F.linear(x, w))
            b = timeit(lambda: F.linear(xb, wb))
            c = timeit(lambda: lp(x, packed, None, "none", [], ""))
            rows.append(f"| {name} ({out_f}x{in_f}) | {m} | {a * 1e6:.0f} | {b * 1e6:.0f} | {c * 1e6:.0f} | {c / a:.2f}x |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# bench/kernels.py\n\n" + text + "\n")


if __name__ == "__main__":
    main()
