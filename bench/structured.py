"""Decode speed with a JSON schema against the same requests without one, same run.

    PYTHONPATH=. python -m bench.structured [--new-tokens 64] [--repeat 3] [--out bench/results/structured.md]

Every request samples (temperature 1, seeded) exactly --new-tokens tokens (ignore_eos; the schema asks
for a long array of small objects so no output completes its grammar early), so both sides run the
same number of steps at the same batch size and the ratio is the cost of the masks: filling the
bitmask per constrained row, applying it, and advancing the matchers. The grammar is compiled in a
warm-up run first (compilation is per schema, not per token). Best of --repeat.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import keel.engine.sampler as sampler_module
from bench.report import publish
from keel import LLM, SamplingParams
from keel.engine.llm_engine import LLMEngine
from keel.engine.output_processor import OutputProcessor

# Time spent in the grammar work itself (mask fill + apply in the sampler, matcher advance in the
# engine), so the overhead can be read even when the machine is too noisy for the ratio.
GRAMMAR_S = [0.0]


def _timed(fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            GRAMMAR_S[0] += time.perf_counter() - t
    return wrapper


sampler_module.apply_bitmasks = _timed(sampler_module.apply_bitmasks)
LLMEngine._fill_grammar_masks = _timed(LLMEngine._fill_grammar_masks)
OutputProcessor._advance_guide = _timed(OutputProcessor._advance_guide)

SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "ok": {"type": "boolean"}, "tag": {"enum": ["a", "bb", "ccc"]}},
    "required": ["id", "ok", "tag"], "additionalProperties": False}}
PROMPT = [{"role": "user", "content": "List many records as JSON with id, ok and tag."}]


def run(llm: LLM, batch: int, new_tokens: int, schema) -> tuple[float, float]:
    """(tokens/s, ms of grammar work per step)"""
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=new_tokens, ignore_eos=True, json_schema=schema)
              for i in range(batch)]
    GRAMMAR_S[0] = 0.0
    t = time.perf_counter()
    outs = llm.chat([PROMPT] * batch, params)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == batch * new_tokens, f"{n} tokens, expected {batch * new_tokens}"
    return n / dt, 1e3 * GRAMMAR_S[0] / new_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM()
    run(llm, 2, 8, SCHEMA)  # warm-up: compiles the grammar, builds the grammar library's tokenizer
    rows = []
    for batch in (1, 16):
        free, guided, grammar_ms = 0.0, 0.0, float("inf")
        for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits both sides
            free = max(free, run(llm, batch, args.new_tokens, None)[0])
            tps, ms = run(llm, batch, args.new_tokens, SCHEMA)
            guided, grammar_ms = max(guided, tps), min(grammar_ms, ms)
        rows.append((batch, free, guided, grammar_ms, 1e3 * batch / free))
    lines = ["# bench/structured.py", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
             f"Built-in model SmolLM2-135M-Instruct, temperature 1, {args.new_tokens} new tokens, best of {args.repeat}",
             "", "| batch | free tok/s | json_schema tok/s | ratio | grammar ms/step | free step ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {b} | {f:.1f} | {g:.1f} | {g / f:.2f}x | {ms:.2f} | {step:.1f} |" for b, f, g, ms, step in rows]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
