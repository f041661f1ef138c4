"""Decode steps with LoRA adapters through the one-call decoder stack (keel/models/fused_decode.py): the
same tokens and log-probabilities, bit for bit, as the module-by-module path, with several adapters and
the base model mixed in each step."""

from __future__ import annotations

import pytest

from keel import LLM, SamplingParams
from keel.kernels.cpu import kernels
from keel.lora import LoRARequest
from keel.models.fused_decode import DecodeStack

pytestmark = pytest.mark.skipif(kernels() is None, reason="keel's CPU kernels need Linux, AVX2, FMA and a C compiler")

NAMES = ["qv-r4", "all-r16", None, "all-r8-rslora", "all-r16", None]
PROMPTS = [list(range(30 + i, 45 + 3 * i)) for i in range(len(NAMES))]


@pytest.mark.parametrize("lora_dtype", ["auto", "float32"])
def test_adapter_steps_through_the_stack_match_the_module_path(lora_case, lora_dtype, monkeypatch):
    ckpt, _, adapters = lora_case("llama-gqa")
    seen = []
    run = DecodeStack.run
    monkeypatch.setattr(DecodeStack, "run", lambda self, x, rope, meta, lora=None:
                        seen.append(lora is not None) or run(self, x, rope, meta, lora))
    kw = dict(dtype="float32", num_blocks=256, block_size=4, enable_lora=True, max_loras=4, lora_dtype=lora_dtype)
    fused, plain = LLM(ckpt, **kw), LLM(ckpt, **kw)
    for llm in (fused, plain):
        for name in ("qv-r4", "all-r16", "all-r8-rslora"):
            llm.add_lora(name, adapters[name][0])
    plain.engine.model.decode_stack = False
    reqs = [None if n is None else LoRARequest(n) for n in NAMES]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    for llm in (fused, plain):  # every adapter resident first: which steps a request joins while its
        llm.generate(PROMPTS, params, lora_request=reqs)  # adapter loads in the background is timing
    a = fused.generate(PROMPTS, params, lora_request=reqs)
    b = plain.generate(PROMPTS, params, lora_request=reqs)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert [lp.top for lp in x.outputs[0].logprobs] == [lp.top for lp in y.outputs[0].logprobs]
    assert any(seen), "the adapter steps did not go through the stack"
    # and the adapters do change the answers (the comparison above is not between two base models)
    base = plain.generate(PROMPTS[:2], params)
    assert [o.outputs[0].token_ids for o in base] != [o.outputs[0].token_ids for o in b[:2]]
