"""Batch invariance, the default: the same prompt, parameters and seed give the same tokens and bit-for-bit
the same log-probabilities alone or in any batch (other requests, other adapters, other requests' prefill
chunks, chunked prefill of its own prompt, preemption), on every path keel's kernels serve: float32
weights, bfloat16 weights, int8 and int4 (the GGUF block formats are these kernels with groups of 32),
with and without LoRA adapters. Each path is forced whatever this machine would pick by default.

Random requests (prompt lengths, seeds, temperatures, n, adapters, token budgets) run alone on one engine,
then all together on another with a small token budget and a small cache, arriving at random steps.
"""

from __future__ import annotations

import random

import pytest
import torch

from keel import LLM, SamplingParams
from keel.kernels.cpu import kernels
from keel.lora import LoRARequest
from keel.quant.config import QuantConfig
from tests.engine.test_engine import drive
from tests.lora.conftest import lora_case  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(kernels() is None, reason="keel's CPU kernels need Linux, AVX2, FMA and a C compiler")

ADAPTER_NAMES = ["qv-r4", "all-r8-rslora", "mlp-r8-layer1"]
PATHS = {
    "float32": dict(),
    "bf16-weights": dict(weight_dtype="bfloat16"),
    "int8": dict(quantization=QuantConfig("int8")),
    "int4": dict(quantization=QuantConfig("int4", 32)),
    "bf16": dict(dtype="bfloat16"),  # bfloat16 activations and cache: keel's matmul, PyTorch's attention
    "torch": dict(kernels="torch"),  # PyTorch's operators only: fixed-size matmul blocks, one query per SDPA
}


def random_requests(n: int, seed: int, adapters: bool):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 47, 70])
        prompt = [rng.randrange(2, 256) for _ in range(length)]
        temperature = rng.choice([0.0, 0.0, 0.5, 0.8, 1.2])
        params = SamplingParams(temperature=temperature, top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1 << 30),
                                max_tokens=rng.randrange(3, 10), ignore_eos=True, logprobs=2,
                                n=rng.choice([1, 1, 1, 2]) if temperature else 1)
        adapter = rng.choice([None] + ADAPTER_NAMES) if adapters else None
        out.append((f"r{i}", prompt, params, adapter))
    return out


def signature(output):
    """Everything that must not depend on the batch: tokens, and every log-probability bit for bit."""
    return [(c.token_ids, [(lp.logprob, [(t, p) for t, _, p in lp.top]) for lp in c.logprobs])
            for c in output.outputs]


def engines(ckpt: str, path: str, adapters: dict | None):
    kw = dict(dict(dtype="float32", kernels="keel", block_size=4), **PATHS[path])
    lora = dict(enable_lora=True, max_loras=2, max_lora_rank=16) if adapters else {}
    solo = LLM(ckpt, num_blocks=256, enable_prefix_caching=False, **kw, **lora)
    # small budget and cache: prefill chunks mix with decodes, prompts are chunked, requests get preempted,
    # and with two resident adapter slots for three adapters, adapters swap in and out between steps
    mixed = LLM(ckpt, num_blocks=40, max_num_batched_tokens=24, max_num_seqs=8, **kw, **lora)
    for llm in (solo, mixed):
        for name in adapters or {}:
            llm.add_lora(name, adapters[name][0])
    return solo, mixed


def check(ckpt: str, path: str, n: int, seed: int, adapters: dict | None) -> None:
    torch.set_num_threads(2)
    solo, mixed = engines(ckpt, path, adapters)
    reqs = random_requests(n, seed, adapters is not None)
    want = {}
    for rid, prompt, params, adapter in reqs:
        out = solo.generate([prompt], params, lora_request=LoRARequest(adapter) if adapter else None)[0]
        want[rid] = signature(out)
    rng = random.Random(seed + 1)
    arrivals: dict[int, list] = {}
    for rid, prompt, params, adapter in reqs:
        arrivals.setdefault(rng.randrange(0, n // 2 + 1), []).append((rid, prompt, params, adapter))
    engine = mixed.engine
    seen_preemption = []
    orig = type(engine.scheduler)._preempt

    def counting(req):
        seen_preemption.append(req.request_id)
        return orig(engine.scheduler, req)
    engine.scheduler._preempt = counting

    class Adding:  # drive() adds (rid, prompt, params); this adds the adapter too
        def __init__(self, eng):
            self.eng = eng

        def add_request(self, rid, prompt, packed):
            params, adapter = packed
            self.eng.add_request(rid, prompt, params, adapter=adapter)

        def step(self):
            return self.eng.step()

        def has_unfinished_requests(self):
            return self.eng.has_unfinished_requests()
    final, history = drive(Adding(engine), {k: [(r, p, (sp, a)) for r, p, sp, a in v] for k, v in arrivals.items()})
    assert max(len(step) for step in history) > 1  # requests did share steps
    differ = [rid for rid, _, _, _ in reqs if signature(final[rid]) != want[rid]]
    assert not differ, f"{len(differ)} of {n} requests differ from their solo run on {path}: {differ[:5]}"
    assert seen_preemption, "the small cache was meant to force preemption"


@pytest.fixture(scope="module")
def setup(lora_case):  # noqa: F811 (the fixture imported above)
    return lora_case("llama-gqa")


@pytest.mark.parametrize("path", list(PATHS))
def test_forty_requests_alone_and_mixed_are_identical(setup, path):
    ckpt, _, adapters = setup
    check(ckpt, path, 40, seed=1, adapters=None)


@pytest.mark.parametrize("path", ["float32", "int4", "bf16", "torch"])
def test_forty_requests_with_adapters_alone_and_mixed_are_identical(setup, path):
    ckpt, _, adapters = setup
    check(ckpt, path, 40, seed=2, adapters=adapters)


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("lora", [False, True])
def test_two_hundred_requests_alone_and_mixed_are_identical(setup, path, lora):
    ckpt, _, adapters = setup
    check(ckpt, path, 200, seed=3, adapters=adapters if lora else None)


@pytest.mark.parametrize("path", ["float32", "torch"])
def test_the_check_catches_a_batch_dependent_engine(setup, path):
    """Negative control: with batch_invariant=False (prefill attention through batched SDPA, matmuls free to
    pick their blocking) the same comparison finds differences, so the tests above can fail."""
    ckpt, _, _ = setup
    PATHS[f"{path}-variant"] = dict(PATHS[path], batch_invariant=False)
    try:
        with pytest.raises(AssertionError, match="differ from their solo run"):
            check(ckpt, f"{path}-variant", 40, seed=1, adapters=None)
    finally:
        del PATHS[f"{path}-variant"]
