"""Decode speed on the device machine's host CPU (AVX-512, AMX) for a SmolLM2-135M-shaped model with random
weights (speed depends on shapes only; the built-in GGUF file is too large to carry there), keel's paths
against each other and transformers, same run, 8 threads.

    PYTHONPATH=.devcarry/site:. CUDA_VISIBLE_DEVICES= python bench/device/cpu_decode.py OUTFILE
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

NEW = 32


def make(folder: str) -> None:
    import transformers

    from tests.models.conftest import write_tokenizer
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    write_tokenizer(folder)


def keel_speed(folder: str, **kw) -> dict:
    from keel import LLM, SamplingParams
    llm = LLM(folder, max_model_len=512, **kw)
    prompt = list(range(2, 30))
    sp = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    out = {"kernels": llm.engine.backend.describe()}
    for b in (1, 16):
        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            llm.generate([prompt] * b, sp)
            best = max(best, b * NEW / (time.perf_counter() - t))
        out[f"b{b}"] = round(best, 1)
    return out


def hf_speed(folder: str, dtype) -> dict:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    out = {}
    for b in (1, 16):
        ids = torch.tensor([list(range(2, 30))] * b)
        best = 0.0
        with torch.inference_mode():
            for _ in range(2):
                t = time.perf_counter()
                m.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
                best = max(best, b * NEW / (time.perf_counter() - t))
        out[f"b{b}"] = round(best, 1)
    return out


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "8")))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        make(tmp)
        configs = {
            "keel default (float32, avx512 build)": {},
            "keel --cpu-isa avx2": dict(cpu_isa="avx2"),
            "keel --no-batch-invariant": dict(batch_invariant=False),
            "keel bf16 weights": dict(weight_dtype="bfloat16"),
            "keel int8": dict(quantization="int8"),
            "keel int4": dict(quantization="int4"),
            "keel dtype=bfloat16 (the old default here)": dict(dtype="bfloat16"),
            "keel --kernels torch": dict(kernels="torch"),
        }
        for name, kw in configs.items():
            try:
                rows[name] = keel_speed(tmp, **kw)
            except Exception as e:  # one failing configuration must not lose the others
                rows[name] = {"error": repr(e)[:300]}
            print(name, rows[name], flush=True)
        for dt in (torch.float32, torch.bfloat16):
            rows[f"transformers {dt}"] = hf_speed(tmp, dt)
            print(dt, rows[f"transformers {dt}"], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
