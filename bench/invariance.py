"""What batch invariance costs: keel's default (batch-invariant) against --no-batch-invariant, and against
a baseline revision from before batch invariance (its default), in the same run, on the built-in model.

    .venv/bin/python -m bench.invariance [--baseline-rev 6943549] [--rounds 3] [--out bench/results/invariance.md]

Measured per configuration: greedy decode tok/s at batch 1 and 16 (64 new tokens after a short prompt),
and prefill tok/s of one 1000-token prompt (max_tokens=1). Every configuration runs in its own process,
the configurations interleaved round by round (on a shared 2-core machine the speed drifts by 10-20%
over minutes, which a run of one configuration after the other turns into a false ratio); the table
gives each one's median over the rounds. The baseline runs in a git worktree of that revision with the
same measuring code (this file, passed on stdin).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def run_in(tree: str, kwargs: dict) -> dict:
    """measure(kwargs) in a fresh process importing keel from `tree`."""
    code = open(__file__).read().split("\nif __name__ ==")[0] + f"\nprint(json.dumps(measure({kwargs!r})))\n"
    r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, cwd=tree,
                       env={**os.environ, "PYTHONPATH": tree})
    if r.returncode:
        raise RuntimeError(f"the run in {tree} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", default="6943549")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from bench.decode import machine
    from bench.report import publish
    from keel.engine.device import cpu_flags
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    base_name = f"baseline {args.baseline_rev} (default)"
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", root, "worktree", "add", "--detach", tree, args.baseline_rev], check=True,
                       capture_output=True)
        try:
            configs = {base_name: (tree, {}), "batch-invariant (default)": (root, {}),
                       "--no-batch-invariant": (root, {"batch_invariant": False})}
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            for r in range(args.rounds):
                for name, (where, kwargs) in configs.items():
                    runs[name].append(run_in(where, kwargs))
                    print(r, name, runs[name][-1], flush=True)
        finally:
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree], capture_output=True)
    keys = ("decode_b1", "decode_b16", "prefill")
    rows = {name: {k: statistics.median(x[k] for x in rs) for k in keys} | {"threads": rs[0]["threads"]}
            for name, rs in runs.items()}
    ref = rows["--no-batch-invariant"]
    isa = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    lines = [f"# Batch invariance cost ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine()}, {os.cpu_count()} cores, flags {' '.join(isa)}; built-in model "
             f"(SmolLM2-135M GGUF, Q4_1/Q8_0 blocks), {ref['threads']} threads; each configuration in its own "
             f"process, {args.rounds} interleaved rounds, medians (within a round: best of 3).", "",
             "| config | decode b=1 tok/s | b=16 tok/s | prefill 1000 tokens tok/s | b=1 / b=16 / prefill vs --no-batch-invariant |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = " / ".join(f"{r[k] / ref[k]:.3f}x" for k in keys)
        lines.append(f"| {name} | {r['decode_b1']:.1f} | {r['decode_b16']:.1f} | {r['prefill']:.0f} | {ratio} |")
    lines += ["", "Every round (tok/s, b=1 / b=16 / prefill):", ""]
    for name, rs in runs.items():
        lines.append(f"- {name}: " + "; ".join(" / ".join(f"{x[k]:.0f}" for k in keys) for x in rs))
    publish(lines, args.out)


if __name__ == "__main__":
    main()
