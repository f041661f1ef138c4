"""Many LoRA adapters in one batch, on the built-in model's shape (SmolLM2-135M), in one run:

    .venv/bin/python -m bench.lora [--out bench/results/lora.md] [--no-peft]

Adapters: random rank-8 and rank-16 (alternating) on all seven projections, written in the PEFT format
(bfloat16, as training usually saves them) under --adapter-dir, once. Workload: 64 requests, greedy,
64 new tokens each, adapter popularity drawn from a power law (P(i) ~ 1/(i+1), as in S-LoRA) over 1,
8, 64 and 512 distinct adapters. For each: keel with the adapters against keel on the base model
alone (same engine, same prompts, prefix cache off, best of --repeat, rounds interleaved), keel's first
run (adapters cold on disk), and PEFT on transformers with mixed-adapter batches (`adapter_names`) on
the same weights. Then the time from a cold adapter on disk to its first token, idle and while 32
other requests decode, and an ablation: one rank for all slots (padding rank-8 adapters to 16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time

import torch

from bench.decode import hf_model, machine
from keel import LLM, SamplingParams
from keel.lora import LoRARequest
from keel.lora.layers import LinearLoRA

PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
NEW_TOKENS = 64
NUM_REQUESTS = 64
MAX_LORAS = 64
DISTINCT = [1, 8, 64, 512]
NUM_COLD = 32  # extra adapters never used before the cold-start measurement
FORMAT = 1


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """Checkpoint projection -> (out, in) for this model."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {"q_proj": (cfg.num_heads * d, h), "k_proj": (cfg.num_kv_heads * d, h),
            "v_proj": (cfg.num_kv_heads * d, h), "o_proj": (h, cfg.num_heads * d),
            "gate_proj": (cfg.intermediate_size, h), "up_proj": (cfg.intermediate_size, h),
            "down_proj": (h, cfg.intermediate_size)}


def make_adapters(folder: str, count: int, cfg) -> list[str]:
    """count PEFT adapter folders a000, a001, ... (reused when already there)."""
    from safetensors.torch import save_file
    names = [f"a{i:03d}" for i in range(count)]
    marker = os.path.join(folder, "made.json")
    want = {"format": FORMAT, "count": count, "layers": cfg.num_layers, "hidden": cfg.hidden_size}
    if os.path.exists(marker) and json.load(open(marker)) == want:
        return names
    shapes = projection_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        r = 8 if i % 2 == 0 else 16
        tensors = {}
        for layer in range(cfg.num_layers):
            for proj, (out, inp) in shapes.items():
                base = f"base_model.model.model.layers.{layer}.{PROJ[proj]}.{proj}"
                tensors[f"{base}.lora_A.weight"] = (torch.randn(r, inp, generator=g) / inp ** 0.5).bfloat16()
                tensors[f"{base}.lora_B.weight"] = (torch.randn(out, r, generator=g) * 0.01).bfloat16()
        path = os.path.join(folder, name)
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                       "target_modules": list(PROJ), "bias": "none", "use_rslora": False, "use_dora": False,
                       "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, f)
    json.dump(want, open(marker, "w"))
    return names


def workload(distinct: int, seed: int) -> list[int]:
    """Adapter index of each request: power-law popularity over `distinct` adapters."""
    rng = random.Random(seed)
    return rng.choices(range(distinct), weights=[1 / (i + 1) for i in range(distinct)], k=NUM_REQUESTS)


def prompts() -> list[str]:
    return [f"Write a short story about a lighthouse keeper number {i}." for i in range(NUM_REQUESTS)]


def keel_tps(llm: LLM, loras) -> float:
    p = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts(), p, lora_request=loras)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    return NUM_REQUESTS * NEW_TOKENS / dt


def peft_tps(folder: str, names: list[str]) -> float:
    """transformers + PEFT on the same (dequantized) weights, one mixed batch with adapter_names."""
    from peft import PeftModel
    model, tok = hf_model(torch.float32)
    distinct = list(dict.fromkeys(names))
    peft = PeftModel.from_pretrained(model, os.path.join(folder, distinct[0]), adapter_name=distinct[0])
    for n in distinct[1:]:
        peft.load_adapter(os.path.join(folder, n), adapter_name=n)
    peft.eval()
    enc = tok(prompts(), return_tensors="pt", padding=True)
    kw = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        t = time.perf_counter()
        out = peft.generate(**enc, **kw, adapter_names=names)
        dt = time.perf_counter() - t
    assert out.shape[1] - enc["input_ids"].shape[1] == NEW_TOKENS
    return NUM_REQUESTS * NEW_TOKENS / dt


def first_token_seconds(llm: LLM, rid: str, adapter: str | None, prompt: str, steps: list | None = None) -> float:
    """Time from add_request (validation included) to the request's first token; appends step times to steps."""
    eng = llm.engine
    t = time.perf_counter()
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), adapter=adapter)
    while True:
        s = time.perf_counter()
        outs = eng.step()
        if steps is not None:
            steps.append(time.perf_counter() - s)
        for out in outs:
            if out.request_id == rid and out.outputs[0].token_ids:
                return time.perf_counter() - t


def cold_start(llm: LLM, cold: list[str], busy: bool) -> tuple[list[float], list[float]]:
    """Cold-adapter time to first token; with busy, while 32 base requests decode. Also returns the
    decode step times of the busy requests (to show loads do not stall them)."""
    eng = llm.engine
    long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    if busy:
        for i in range(32):
            eng.add_request(f"busy-{i}", f"Tell me everything about topic {i}.", long)
        for _ in range(3):
            eng.step()
    ttft, steps = [], []
    for k, name in enumerate(cold):
        ttft.append(first_token_seconds(llm, f"cold-{busy}-{k}", name, "Write a haiku about the sea.", steps))
    for i in range(32 if busy else 0):
        eng.abort_request(f"busy-{i}")
    return ttft, steps


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def svg_plot(rows: list[dict], path: str) -> None:
    """Throughput against distinct adapters (log x), no plotting library needed."""
    W, H, L, B = 520, 320, 60, 40
    xs = [r["distinct"] for r in rows]
    ymax = max(max(r["base"], r["lora"], r.get("peft") or 0) for r in rows) * 1.1
    import math
    def px(x):
        return L + (math.log2(x) - math.log2(xs[0])) / (math.log2(xs[-1]) - math.log2(xs[0])) * (W - L - 20)
    def py(y):
        return H - B - y / ymax * (H - B - 20)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             'font-size="12">',
             f'<line x1="{L}" y1="{H - B}" x2="{W - 10}" y2="{H - B}" stroke="black"/>',
             f'<line x1="{L}" y1="{H - B}" x2="{L}" y2="10" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 5}" text-anchor="middle">distinct adapters in the batch of 64 requests</text>',
             f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">tokens/s</text>']
    for x in xs:
        parts.append(f'<text x="{px(x)}" y="{H - B + 15}" text-anchor="middle">{x}</text>')
    for k in range(5):
        y = ymax / 1.1 * k / 4
        parts.append(f'<text x="{L - 5}" y="{py(y) + 4}" text-anchor="end">{y:.0f}</text>')
    for key, color, label in [("base", "gray", "keel, base model"), ("lora", "blue", "keel, adapters"),
                              ("peft", "red", "PEFT mixed batch")]:
        pts = [(px(r["distinct"]), py(r[key])) for r in rows if r.get(key)]
        if not pts:
            continue
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                     + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
        i = ["base", "lora", "peft"].index(key)
        parts.append(f'<text x="{W - 150}" y="{30 + 16 * i}" fill="{color}">{label}</text>')
    parts.append("</svg>")
    open(path, "w").write("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter-dir", default="/tmp/keel-bench-lora")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; 1 keeps a shared 2-core machine's other jobs from stalling every op")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]

    llm = LLM(max_num_seqs=NUM_REQUESTS, enable_prefix_caching=False, enable_lora=True,
              max_loras=MAX_LORAS, max_lora_rank=16, max_cpu_loras=MAX_LORAS)
    eng = llm.engine
    t = time.perf_counter()
    names = make_adapters(args.adapter_dir, max(DISTINCT) + NUM_COLD, eng.model_config)
    made_s = time.perf_counter() - t
    cold_names = names[max(DISTINCT):]
    for n in names:
        eng.adapters.register(n, os.path.join(args.adapter_dir, n))
    keel_tps(llm, None)  # warm-up

    rows = []
    for d in DISTINCT:
        idx = workload(d, seed=d)
        loras = [LoRARequest(names[i]) for i in idx]
        first = keel_tps(llm, loras)  # the adapters come from disk during this run
        base, lora = [], []
        for _ in range(args.repeat):
            base.append(keel_tps(llm, None))
            lora.append(keel_tps(llm, loras))
        rows.append({"distinct": d, "used": len(set(idx)), "base": max(base), "lora": max(lora), "first": first,
                     "ranks": sorted({8 if i % 2 == 0 else 16 for i in idx})})
        print(rows[-1], flush=True)

    # Ablation: one rank for every slot (rank-8 adapters padded to 16), at 64 distinct adapters: for the
    # CPU kernel (LinearLoRA.pad_ranks) and the torch path's rank groups alike.
    idx = workload(64, seed=64)
    loras = [LoRARequest(names[i]) for i in idx]
    costs = eng.lora.costs
    padded, grouped = [], []
    for _ in range(args.repeat):
        eng.lora.costs = dataclasses.replace(costs, split_min_rank_slots=float("inf"))
        LinearLoRA.pad_ranks = True
        padded.append(keel_tps(llm, loras))
        eng.lora.costs = dataclasses.replace(costs, split_min_rank_slots=0)
        LinearLoRA.pad_ranks = False
        grouped.append(keel_tps(llm, loras))
    eng.lora.costs = costs
    padded, grouped = max(padded), max(grouped)

    ttft_idle, _ = cold_start(llm, cold_names[:NUM_COLD // 2], busy=False)
    base_steps = []
    long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i in range(32):
        eng.add_request(f"ref-{i}", f"Tell me everything about topic {i}.", long)
    for _ in range(3):
        eng.step()
    for _ in range(NUM_COLD // 2):
        t = time.perf_counter()
        eng.step()
        base_steps.append(time.perf_counter() - t)
    for i in range(32):
        eng.abort_request(f"ref-{i}")
    ttft_busy, busy_steps = cold_start(llm, cold_names[NUM_COLD // 2:], busy=True)
    warm = [first_token_seconds(llm, f"warm-{k}", cold_names[0], "Write a haiku about the sea.") for k in range(5)]
    base_ttft = [first_token_seconds(llm, f"base-{k}", None, "Write a haiku about the sea.") for k in range(5)]
    lora_store = str(eng.lora.store_dtype).replace("torch.", "")
    quant = eng.quantization
    del llm, eng

    weights = "dense" if quant is None else "its GGUF blocks" if quant.method == "gguf" else quant.describe()

    def write_report() -> None:
        lines = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; load average {load_at_start:.1f} at the start "
                 f"(other jobs share the machine)",
                 f"Built-in model SmolLM2-135M-Instruct ({weights}, float32 compute; PEFT on the dequantized "
                 f"weights); {NUM_REQUESTS} requests, "
                 f"greedy, {NEW_TOKENS} new tokens each, all submitted at once; adapters rank 8 and 16 (alternating) "
                 f"on all seven projections, bfloat16 on disk; keel max_loras={MAX_LORAS}, "
                 f"max_cpu_loras={MAX_LORAS}, adapters stored as {lora_store}, prefix cache off; "
                 f"best of {args.repeat} (rounds interleaved with the base-model runs); PEFT one run.",
                 "",
                 "| distinct adapters | used by the 64 requests | keel base tok/s | keel adapters tok/s | ratio | "
                 "goal | keel first run (cold) tok/s | PEFT mixed batch tok/s | keel / PEFT |",
                 "|---|---|---|---|---|---|---|---|---|"]
        goals = {64: ">= 0.8x", 512: ">= 0.7x"}
        for r in rows:
            peft = r.get("peft")
            peft_cells = f"{peft:.1f} | {r['lora'] / peft:.1f}x" if peft else "- | -"
            lines.append(f"| {r['distinct']} | {r['used']} | {r['base']:.1f} | {r['lora']:.1f} | "
                         f"{r['lora'] / r['base']:.2f}x | {goals.get(r['distinct'], '')} | {r['first']:.1f} | "
                         f"{peft_cells} |")
        lines += ["",
                  f"Rank handling at 64 distinct adapters: each slot at its own rank {grouped:.1f} tok/s, every slot "
                  f"padded to rank 16 {padded:.1f} tok/s ({grouped / padded:.2f}x).",
                  "",
                  "Time from a cold adapter (registered, never read) to its first token, short prompt, "
                  f"{NUM_COLD // 2} adapters each (p99 of 16 samples is their maximum):",
                  "",
                  "| | p50 ms | p99 ms |",
                  "|---|---|---|",
                  f"| cold adapter, engine idle | {pct(ttft_idle, .5) * 1e3:.0f} | {pct(ttft_idle, .99) * 1e3:.0f} |",
                  f"| cold adapter, 32 requests decoding | {pct(ttft_busy, .5) * 1e3:.0f} | "
                  f"{pct(ttft_busy, .99) * 1e3:.0f} |",
                  f"| resident adapter, idle | {pct(warm, .5) * 1e3:.0f} | {pct(warm, .99) * 1e3:.0f} |",
                  f"| base model, idle | {pct(base_ttft, .5) * 1e3:.0f} | {pct(base_ttft, .99) * 1e3:.0f} |",
                  "",
                  f"Engine step with 32 base requests decoding: {statistics.median(base_steps) * 1e3:.0f} ms median "
                  f"alone, {statistics.median(busy_steps) * 1e3:.0f} ms median (max {max(busy_steps) * 1e3:.0f} ms) "
                  "while cold adapters are validated, read in the background and join the batch.",
                  f"Writing the {len(names)} adapter folders took {made_s:.0f} s (0 when reused).",
                  "",
                  "![throughput against distinct adapters](lora.svg)"]
        text = "\n".join(lines)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write("# bench/lora.py\n\n" + text + "\n")
            svg_plot(rows, os.path.join(os.path.dirname(args.out), "lora.svg"))

    write_report()  # the keel numbers are safe on disk before the (slow) PEFT baseline
    if not args.no_peft:
        for r in sorted((r for r in rows if r["distinct"] in (8, 64)), key=lambda r: -r["distinct"]):
            idx = workload(r["distinct"], seed=r["distinct"])  # the goal's row (64) first
            r["peft"] = peft_tps(args.adapter_dir, [names[i] for i in idx])
            print(r, flush=True)
            write_report()


if __name__ == "__main__":
    main()
