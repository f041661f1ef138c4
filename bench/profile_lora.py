"""Where a decode step's time goes with many adapters: torch.profiler over a few steps of the
bench/lora.py workload (64 requests, power-law popularity over 64 adapters).

    .venv/bin/python -m bench.profile_lora [--distinct 64] [--steps 5]
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from bench.lora import NEW_TOKENS, make_adapters, prompts, workload
from keel import LLM, SamplingParams
from keel.lora import LoRARequest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--distinct", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--adapter-dir", default="/tmp/keel-bench-lora")
    args = ap.parse_args()
    llm = LLM(enable_lora=True, max_loras=64, max_cpu_loras=64, max_lora_rank=16, enable_prefix_caching=False)
    names = make_adapters(args.adapter_dir, args.distinct, llm.engine.model_config)
    for n in names:
        llm.engine.adapters.register(n, f"{args.adapter_dir}/{n}")
    loras = [LoRARequest(names[i]) for i in workload(args.distinct, 0)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate(prompts(), params, lora_request=loras)  # warm-up: every adapter loaded
    eng = llm.engine
    for i, prompt in enumerate(prompts()):
        eng.add_request(f"r{i}", prompt, params, adapter=loras[i].name)
    for _ in range(8):  # past the prefills
        eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            eng.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
