"""What batch invariance costs: keel's default (batch-invariant) against --no-batch-invariant, and against
a baseline revision from before batch invariance (its default), in the same run, on the built-in model.

    .venv/bin/python -m bench.invariance [--baseline-rev 6943549] [--out bench/results/invariance.md]

Measured per configuration: greedy decode tok/s at batch 1 and 16 (64 new tokens after a short prompt),
and prefill tok/s of one 1000-token prompt (max_tokens=1). The baseline runs in a git worktree of that
revision in a subprocess, with the same measuring code (this file, passed on stdin).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

NEW = 64
PROMPT_WORDS = "The history of the city begins with a small harbour on the river. " * 80


def measure(kwargs: dict) -> dict:
    import torch

    from keel import LLM, SamplingParams
    llm = LLM(**kwargs)
    tok = llm.tokenizer
    short = tok.encode_chat([{"role": "user", "content": "Tell me a story about a lighthouse keeper."}])
    long = tok.encode(PROMPT_WORDS)[:1000]
    greedy = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    out = {"threads": torch.get_num_threads()}
    llm.generate([short], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm up
    for b in (1, 16):
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            llm.generate([short] * b, greedy)
            best = max(best, b * NEW / (time.perf_counter() - t))
        out[f"decode_b{b}"] = best
    best = 0.0
    for i in range(3):
        prompt = [long[0] + i] + long[1:]  # no prefix-cache hit between the repeats
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
        best = max(best, len(prompt) / (time.perf_counter() - t))
    out["prefill"] = best
    return out


def baseline(rev: str) -> dict:
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", root, "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
        try:
            code = open(__file__).read().split("\nif __name__ ==")[0] + "\nprint(json.dumps(measure({})))\n"
            r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, cwd=tree,
                               env={**os.environ, "PYTHONPATH": tree})
            if r.returncode:
                raise RuntimeError(f"the baseline run failed: {r.stderr[-2000:]}")
            return json.loads(r.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree], capture_output=True)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", default="6943549")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from keel.engine.device import cpu_flags
    rows = {f"baseline {args.baseline_rev} (default)": baseline(args.baseline_rev)}
    print(rows, flush=True)
    rows["batch-invariant (default)"] = measure({})
    rows["--no-batch-invariant"] = measure({"batch_invariant": False})
    ref = rows["--no-batch-invariant"]
    isa = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    lines = [f"# Batch invariance cost ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, flags {' '.join(isa)}; built-in model "
             f"(SmolLM2-135M GGUF, Q4_1/Q8_0 blocks), {ref['threads']} threads, best of 3.", "",
             "| config | decode b=1 tok/s | b=16 tok/s | prefill 1000 tokens tok/s | b=1 / b=16 / prefill vs --no-batch-invariant |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = " / ".join(f"{r[k] / ref[k]:.3f}x" for k in ("decode_b1", "decode_b16", "prefill"))
        lines.append(f"| {name} | {r['decode_b1']:.1f} | {r['decode_b16']:.1f} | {r['prefill']:.0f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
