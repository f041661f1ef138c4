"""Where a decode step's time goes: torch.profiler over decode steps of the built-in model.

    .venv/bin/python -m bench.profile_decode [--batch 1] [--steps 20] [--dtype float32] [--quantize int8]
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from keel import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantize", default=None)
    args = ap.parse_args()
    llm = LLM(dtype=args.dtype, quantization=args.quantize, enable_prefix_caching=False)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.steps * 3 + 20, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request(f"r{i}", f"Write a short story about a lighthouse keeper number {i}.", params)
    for _ in range(10):  # past the prefill
        eng.step()
    t = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    wall = (time.perf_counter() - t) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            eng.step()
    print(f"batch {args.batch}: {wall * 1e3:.1f} ms per step unprofiled ({args.batch / wall:.1f} tok/s)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
