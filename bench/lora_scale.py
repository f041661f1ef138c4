"""LoRA at the scale a platform with one adapter per customer meets (issue 23), on the built-in model's
shape, in one run:

    .venv/bin/python -m bench.lora_scale [--out bench/results/lora_scale.md] [--no-peft] [--registered 2000]

Workloads beside bench/lora.py's power law, every one against the base model in the same engine with the
same prompts (rounds interleaved, best of --repeat):
- uniform: every request its own adapter, 64 requests (64 adapters resident) and 256 requests (256);
- registered: --registered adapters (2,000) registered, each round of 64 requests drawing uniformly from
  all of them, with 64 resident slots and 256 in host memory: most draws come from disk, so the tiers
  (disk -> host -> resident) do real work while the batch decodes;
- cold start: the time to first token of an adapter never read before against a resident one's, both
  while 32 other requests decode (p50 and p99 of 16 each).
The share of step time spent in adapter work is 1 - base time / adapter time of the same workload.
PEFT (transformers + peft, one mixed batch with adapter_names) runs the uniform 64-adapter batch.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from bench.decode import machine
from bench.lora import first_token_seconds, make_adapters, pct, peft_tps
from bench.report import publish
from keel import LLM, SamplingParams
from keel.lora import LoRARequest
from keel.models.loader import default_model_path, open_checkpoint

NEW_TOKENS = 64
HAIKU = "Write a haiku about the sea."


def prompts(n: int) -> list[str]:
    return [f"Write a short story about a lighthouse keeper number {i}." for i in range(n)]


def tps(llm: LLM, n: int, loras) -> float:
    p = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts(n), p, lora_request=loras)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    return n * NEW_TOKENS / dt


def engine(max_loras: int, max_cpu_loras: int, max_seqs: int) -> LLM:
    return LLM(max_num_seqs=max_seqs, enable_prefix_caching=False, enable_lora=True, max_loras=max_loras,
               max_lora_rank=16, max_cpu_loras=max_cpu_loras)


def uniform(names: list[str], folder: str, n: int, repeat: int) -> dict:
    llm = engine(n, n, n)
    for name in names[:n]:
        llm.engine.adapters.register(name, os.path.join(folder, name))
    loras = [LoRARequest(names[i]) for i in range(n)]
    tps(llm, n, None)
    first = tps(llm, n, loras)  # every adapter read from disk during this run
    base, lora = [], []
    for _ in range(repeat):
        base.append(tps(llm, n, None))
        lora.append(tps(llm, n, loras))
    return {"workload": f"uniform, {n} requests, {n} adapters", "base": max(base), "lora": max(lora), "first": first}


def registered(names: list[str], folder: str, repeat: int, seed: int = 0) -> dict:
    llm = engine(64, 256, 64)
    t = time.perf_counter()
    for name in names:
        llm.engine.adapters.register(name, os.path.join(folder, name))
    reg_s = time.perf_counter() - t
    rng = random.Random(seed)
    tps(llm, 64, None)
    base, lora = [], []
    for _ in range(repeat):  # each round new draws: mostly adapters not in host memory
        base.append(tps(llm, 64, None))
        lora.append(tps(llm, 64, [LoRARequest(names[rng.randrange(len(names))]) for _ in range(64)]))
    return {"workload": f"{len(names)} registered, 64 requests drawing from all", "base": max(base),
            "lora": max(lora), "first": None, "register_s": reg_s}


def cold_vs_resident(names: list[str], folder: str) -> dict:
    """First-token times while 32 base requests decode: cold adapters (never read) and a resident one."""
    llm = engine(64, 64, 64)
    eng = llm.engine
    cold, resident = names[:16], names[16]
    for name in cold + [resident]:
        eng.adapters.register(name, os.path.join(folder, name))
    first_token_seconds(llm, "load-resident", resident, HAIKU)
    long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i in range(32):
        eng.add_request(f"busy-{i}", f"Tell me everything about topic {i}.", long)
    for _ in range(3):
        eng.step()
    out = {"cold": [], "resident": []}
    for k, name in enumerate(cold):  # alternate, so both see the same load
        out["cold"].append(first_token_seconds(llm, f"cold-{k}", name, HAIKU))
        out["resident"].append(first_token_seconds(llm, f"res-{k}", resident, HAIKU))
    for i in range(32):
        eng.abort_request(f"busy-{i}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter-dir", default="/tmp/keel-bench-lora-scale")
    ap.add_argument("--registered", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    cfg = open_checkpoint(default_model_path()).config
    t = time.perf_counter()
    names = make_adapters(args.adapter_dir, max(args.registered, 256), cfg)
    made_s = time.perf_counter() - t

    rows = [uniform(names, args.adapter_dir, 64, args.repeat), uniform(names, args.adapter_dir, 256, args.repeat),
            registered(names, args.adapter_dir, args.repeat)]
    for r in rows:
        print(r, flush=True)
    cold = cold_vs_resident(names[-17:], args.adapter_dir)
    peft = None if args.no_peft else peft_tps(args.adapter_dir, names[:64])

    lines = ["# bench/lora_scale.py", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; load average {load:.1f} at the start",
             f"Built-in model SmolLM2-135M-Instruct (its defaults), greedy, {NEW_TOKENS} new tokens per request, all "
             "submitted at once; adapters rank 8 and 16 (alternating) on all seven projections, bfloat16 on disk; "
             f"prefix cache off; best of {args.repeat}, base and adapter rounds interleaved.", "",
             "| workload | keel base tok/s | keel adapters tok/s | ratio | goal | share of step time in adapter work "
             "| first run (cold) tok/s |", "|---|---|---|---|---|---|---|"]
    goals = {0: ">= 0.85x", 2: ">= 0.8x"}
    for i, r in enumerate(rows):
        first = f"{r['first']:.1f}" if r["first"] else "-"
        lines.append(f"| {r['workload']} | {r['base']:.1f} | {r['lora']:.1f} | {r['lora'] / r['base']:.2f}x | "
                     f"{goals.get(i, '')} | {1 - r['lora'] / r['base']:.0%} | {first} |")
    lines += ["", "PEFT, one mixed batch of 64 requests with 64 distinct adapters: "
              + (f"{peft:.1f} tok/s; keel {rows[0]['lora'] / peft:.1f}x (goal >= 10x)." if peft else "not run."),
              "", "First token of an adapter while 32 requests decode (16 samples each, p99 = their maximum):", "",
              "| | p50 ms | p99 ms |", "|---|---|---|",
              f"| cold (never read) | {pct(cold['cold'], .5) * 1e3:.0f} | {pct(cold['cold'], .99) * 1e3:.0f} |",
              f"| resident | {pct(cold['resident'], .5) * 1e3:.0f} | {pct(cold['resident'], .99) * 1e3:.0f} |",
              f"| cold / resident at p99 | | {pct(cold['cold'], .99) / pct(cold['resident'], .99):.2f}x (goal <= 2x) |",
              "", f"Registering {args.registered} adapters took {rows[2]['register_s']:.1f} s; writing their folders "
              f"{made_s:.0f} s (0 when reused)."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
