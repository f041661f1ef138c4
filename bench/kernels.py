"""The measurements behind three kernel choices, on this machine, in one run:

1. the default dtype on a CPU (keel/engine/device.py): float32 against bfloat16 matmuls;
2. oneDNN-packed weights (keel/layers/linear.py Linear.pack_for_cpu) against F.linear;
3. gathering the KV cache by blocks rather than by slots (keel/layers/attention.py).

    .venv/bin/python -m bench.kernels [--out bench/results/kernels.md]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.decode import machine

SHAPES = [(960, 576, "qkv"), (3072, 576, "gate_up"), (576, 1536, "down"), (49152, 576, "output head")]


def best_times(fns, rounds: int = 5, calls: int = 20) -> list[float]:
    """Per-call time of each candidate: the best of several rounds of back-to-back calls. Candidates
    take turns round by round (so a noisy moment hits all of them), but each round runs one kernel
    repeatedly: alternating kernels call by call makes their thread pools wait on each other."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            f()
            t = time.perf_counter()
            for _ in range(calls):
                f()
            best[i] = min(best[i], (time.perf_counter() - t) / calls)
    return best


def gather_rows() -> list[str]:
    """The KV gather of attention (keel/layers/attention.py): 16 requests, 3 KV heads of 64."""
    B, KVH, D, bs = 16, 3, 64, 16
    cache = torch.randn(4000 * bs, KVH, D)
    rows = ["", "KV gather for 16 requests, microseconds (best of interleaved runs):", "",
            "| context | per-slot indexing | index_select of blocks | ratio |", "|---|---|---|---|"]
    for L in (64, 320, 1024):
        nb = L // bs
        blocks = torch.stack([torch.arange(b * 70, b * 70 + nb) for b in range(B)])
        slots = (blocks.unsqueeze(-1) * bs + torch.arange(bs)).view(B, -1)
        a, b = best_times([lambda: cache[slots], lambda: cache.view(-1, bs, KVH, D).index_select(0, blocks.view(-1))])
        rows.append(f"| {L} | {a * 1e6:.0f} | {b * 1e6:.0f} | {b / a:.2f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lp = torch.ops.mkldnn._linear_pointwise
    rows = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}", "",
            "Microseconds per call (best of interleaved runs), SmolLM2-135M projection shapes.", "",
            "| layer (out x in) | tokens | F.linear fp32 | F.linear bf16 | packed fp32 | packed / F.linear fp32 |",
            "|---|---|---|---|---|---|"]
    for out_f, in_f, name in SHAPES:
        w = torch.randn(out_f, in_f)
        wb = w.bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        for m in (1, 16):
            x = torch.randn(m, in_f)
            xb = x.bfloat16()
            a, b, c = best_times([lambda: F.linear(x, w), lambda: F.linear(xb, wb),
                                  lambda: lp(x, packed, None, "none", [], "")], calls=5 if out_f > 10000 else 20)
            rows.append(f"| {name} ({out_f}x{in_f}) | {m} | {a * 1e6:.0f} | {b * 1e6:.0f} | {c * 1e6:.0f} | {c / a:.2f}x |")
    rows += gather_rows()
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# bench/kernels.py\n\n" + text + "\n")


if __name__ == "__main__":
    main()
