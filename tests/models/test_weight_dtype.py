"""weight_dtype: a float32 model on CPU keeps the weights a checkpoint stores in bfloat16 in bfloat16
("auto"), exactly, with half the memory, computing in float32 through keel's kernels."""

from __future__ import annotations

import pytest
import torch

from keel import LLM, SamplingParams
from keel.errors import InvalidRequestError
from keel.kernels.cpu import kernels
from keel.layers.linear import Linear
from keel.server.fingerprint import system_fingerprint
from tests.models.conftest import make_checkpoint, write_tokenizer

pytestmark = pytest.mark.skipif(kernels() is None, reason="keel's CPU kernels need Linux, AVX2, FMA and a C compiler")

PROMPTS = [[5, 6, 7], [9, 30, 31, 32, 33, 34, 35, 36, 40], [70]]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


def bf16_checkpoint(folder: str, case: str) -> None:
    model = make_checkpoint(folder + "-f32", case)
    model.to(torch.bfloat16).save_pretrained(folder)
    write_tokenizer(folder)


def dense_weights(llm) -> list[torch.Tensor]:
    return [m.weight for m in llm.engine.model.modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("case", ["llama-tied", "qwen2-bias"])
def test_bf16_checkpoint_keeps_bf16_weights_and_computes_the_same(tmp_path, case):
    folder = str(tmp_path / case)
    bf16_checkpoint(folder, case)
    auto = LLM(folder, dtype="float32", max_model_len=64)
    model = LLM(folder, dtype="float32", max_model_len=64, weight_dtype="model")
    assert all(w.dtype == torch.bfloat16 for w in dense_weights(auto))
    assert all(w.dtype == torch.float32 for w in dense_weights(model))
    emb = auto.engine.model.model.embed_tokens.weight
    assert emb.dtype == torch.bfloat16
    if case == "llama-tied":  # the tied head reads the embedding table itself
        assert auto.engine.model.tied_head.weight.data_ptr() == emb.data_ptr()
    assert auto.engine.weight_bytes()["total"] < 0.55 * model.engine.weight_bytes()["total"]
    # the same values in float32 or bfloat16, the same kernels: the same results, bit for bit
    a, b = auto.generate(PROMPTS, PARAMS), model.generate(PROMPTS, PARAMS)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert [lp.top for lp in x.outputs[0].logprobs] == [lp.top for lp in y.outputs[0].logprobs]
    assert system_fingerprint(auto.engine) == system_fingerprint(model.engine)  # nothing was rounded


def test_float32_checkpoint_is_rounded_only_when_asked(checkpoints):
    folder, _ = checkpoints("llama-gqa")
    auto = LLM(folder, dtype="float32", max_model_len=64)
    assert all(w.dtype == torch.float32 for w in dense_weights(auto))
    rounded = LLM(folder, dtype="float32", max_model_len=64, weight_dtype="bfloat16")
    assert all(w.dtype == torch.bfloat16 for w in dense_weights(rounded))
    assert system_fingerprint(rounded.engine) != system_fingerprint(auto.engine)
    a, b = auto.generate(PROMPTS, PARAMS), rounded.generate(PROMPTS, PARAMS)
    first = [(x.outputs[0].logprobs[0].logprob, y.outputs[0].logprobs[0].logprob) for x, y in zip(a, b)]
    assert all(abs(p - q) < 0.05 for p, q in first) and any(p != q for p, q in first)  # close, not equal


def test_invalid_weight_dtype(checkpoints):
    folder, _ = checkpoints("llama-gqa")
    with pytest.raises(InvalidRequestError, match="weight_dtype"):
        LLM(folder, weight_dtype="int3")
