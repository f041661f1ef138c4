"""`keel quantize` round trips, quantizing at load, and every bad input named clearly."""

import argparse
import json
import os

import gguf
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from keel import LLM, SamplingParams
from keel.errors import InvalidRequestError, KeelError, ModelLoadError
from keel.layers.linear import Linear
from keel.quant import QuantConfig
from keel.quant.checkpoint import quantize_checkpoint
from keel.quant.cli import add_quantize_parser
from keel.quant.layer import QuantLinear
from tests.quant.conftest import make_wide_checkpoint, write_gguf

PROMPTS = [[3, 17, 42, 9, 200], [100, 5]]


def _llm(model, quantization=None):
    return LLM(model, quantization=quantization, max_model_len=64, num_blocks=16)


def _outputs(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))
    return [(o.outputs[0].token_ids, [(lp.logprob, lp.top) for lp in o.outputs[0].logprobs]) for o in outs]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("wide") / "m")
    make_wide_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    write_gguf(path, gguf.GGMLQuantizationType.Q4_1)
    return str(path)


@pytest.mark.parametrize("source, cfg", [
    ("llama-gqa", QuantConfig("int8")),
    ("qwen2-bias", QuantConfig("int4")),
    ("llama-tied", QuantConfig("int4", quantize_embeddings=True)),
    ("llama-gqa", QuantConfig("int8", quantize_embeddings=True)),
    ("wide", QuantConfig("int4", 128)),
    ("gguf", QuantConfig("int4")),
])
def test_quantized_checkpoint_gives_the_same_outputs_as_quantizing_at_load(
        tmp_path, hf_checkpoint, wide, q4_gguf, source, cfg):
    src = {"wide": wide, "gguf": q4_gguf}.get(source) or hf_checkpoint(source)
    out = str(tmp_path / "q")
    summary = quantize_checkpoint(src, out, cfg)
    with safe_open(os.path.join(out, summary["files"][0]), "pt") as f:
        names = set(f.keys())
    assert not any(n.endswith("_proj.weight") for n in names)  # no full-precision projection is written
    assert any(n.endswith("q_proj.qweight") for n in names)

    cfg = summary["config"]  # from a GGUF whose embedding is quantized: the embedding too
    at_load, loaded = _llm(src, cfg), _llm(out)
    assert loaded.engine.quantization == cfg
    for llm in (at_load, loaded):
        projections = [m for m in llm.engine.model.model.layers.modules() if isinstance(m, Linear)]
        assert projections and all(isinstance(m, QuantLinear) for m in projections)
    assert _outputs(loaded) == _outputs(at_load)  # bit for bit: tokens and log-probabilities
    assert loaded.engine.weight_bytes() == at_load.engine.weight_bytes()


def test_cli_writes_a_loadable_folder(tmp_path, hf_checkpoint, capsys):
    parser = argparse.ArgumentParser(prog="keel")
    add_quantize_parser(parser.add_subparsers(dest="command", required=True))
    out = str(tmp_path / "q")
    args = parser.parse_args(["quantize", hf_checkpoint("llama-gqa"), out, "--method", "int4", "--group-size", "32"])
    assert args.func(args) == 0
    assert "int4, group size 32" in capsys.readouterr().out
    with open(os.path.join(out, "quantization_config.json")) as f:
        assert json.load(f) == {"quant_method": "keel", "format_version": 1, "method": "int4", "group_size": 32,
                                "quantize_embeddings": False}
    assert _llm(out).engine.quantization == QuantConfig("int4", 32)
    with pytest.raises(SystemExit):  # argparse: an unknown method is a usage error
        parser.parse_args(["quantize", "m", out, "--method", "int3"])


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("make, error, words", [
    (lambda: QuantConfig("int3"), InvalidRequestError, ["quantization='int3'", "int8, int4"]),
    (lambda: QuantConfig("int4", 48), InvalidRequestError, ["group_size=48", "32, 64, 128"]),
    (lambda: QuantConfig("int8", 32), InvalidRequestError, ["group_size=32", "int8", "per output channel"]),
])
def test_bad_configs(make, error, words):
    with pytest.raises(error) as err:
        make()
    for w in words:
        assert w in str(err.value)


def test_unknown_method_at_load(hf_checkpoint):
    with pytest.raises(InvalidRequestError, match="quantization='fp3' is invalid"):
        _llm(hf_checkpoint("llama-gqa"), "fp3")


def test_group_size_that_does_not_divide_a_layer(hf_checkpoint):
    with pytest.raises(ModelLoadError) as err:
        _llm(hf_checkpoint("llama-gqa"), QuantConfig("int4", 64))
    assert str(err.value) == ("int4 group size 64 does not divide the 96 input channels of "
                              "model.layers.0.mlp.down_proj (and 1 more layers); group sizes that divide every "
                              "layer: 32")


def test_quantizing_a_quantized_checkpoint(tmp_path, hf_checkpoint):
    out = str(tmp_path / "q")
    quantize_checkpoint(hf_checkpoint("llama-gqa"), out, QuantConfig("int4"))
    with pytest.raises(ModelLoadError, match="is already quantized \\(int4, group size 32\\); quantize the original"):
        quantize_checkpoint(out, str(tmp_path / "again"), QuantConfig("int8"))
    assert not os.path.exists(tmp_path / "again")
    with pytest.raises(ModelLoadError, match="already quantized .*cannot be quantized again as int8"):
        _llm(out, "int8")
    assert _llm(out, "int4").engine.quantization == QuantConfig("int4")  # the same config is no change


def test_output_folder_must_be_new_or_empty(tmp_path, hf_checkpoint):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(KeelError, match="already exists and is not an empty folder"):
        quantize_checkpoint(hf_checkpoint("llama-gqa"), str(tmp_path / "full"), QuantConfig("int8"))
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


@pytest.fixture
def quantized(tmp_path, wide):
    out = str(tmp_path / "q")
    quantize_checkpoint(wide, out, QuantConfig("int4", 32))
    return out


def _edit_config(folder, **changes):
    path = os.path.join(folder, "quantization_config.json")
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)


@pytest.mark.parametrize("changes, words", [
    ({"method": "int8", "group_size": None}, ["model.layers.0.mlp.down_proj.qweight: the checkpoint has uint8 "
                                              "(128, 128), but int8 needs int8 (128, 256)", "does not match the tensors"]),
    ({"group_size": 64}, ["down_proj.scales: the checkpoint has bfloat16 (128, 8), but int4 with group size 64 "
                          "needs bfloat16 (128, 4)", "does not match the tensors"]),
    # a config without embedding_method (as written before it existed) means the embedding in `method`
    ({"quantize_embeddings": True}, ["lm_head.weight does not belong in a int4 with group size 32 layer",
                                     "(int4, group size 32, embedding and head int4) does not match"]),
    ({"quantize_embeddings": True, "embedding_method": "int8"}, ["lm_head.weight does not belong in a int8 layer",
                                                                 "(int4, group size 32, embedding and head int8)"]),
    ({"method": "int5"}, ["quantization_config.json", "quantization='int5' is invalid"]),
    ({"quant_method": "gptq"}, ["not a keel quantization config", "'gptq'"]),
])
def test_config_that_does_not_match_the_tensors(quantized, changes, words):
    _edit_config(quantized, **changes)
    with pytest.raises(ModelLoadError) as err:
        _llm(quantized)
    for w in words:
        assert w in str(err.value)


def test_quantized_tensor_the_config_does_not_quantize(tmp_path, hf_checkpoint):
    out = str(tmp_path / "q")
    quantize_checkpoint(hf_checkpoint("llama-gqa"), out, QuantConfig("int8", quantize_embeddings=True))
    _edit_config(out, quantize_embeddings=False)
    with pytest.raises(ModelLoadError, match="lm_head.qweight is a quantized tensor, but .* leaves "
                                             "lm_head unquantized"):
        _llm(out)


def test_missing_quantized_tensor(quantized):
    path = os.path.join(quantized, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match="lacks 1 tensors, e.g. model.layers.1.mlp.down_proj.scales"):
        _llm(quantized)


@pytest.mark.parametrize("source", ["quantized", "float"])
def test_no_full_precision_projection_weight_reaches_the_model(monkeypatch, quantized, wide, source):
    """Quantizing at load converts each weight before the model sees it; a quantized folder holds none."""
    import keel.models.loader as loader
    seen, real = [], loader.load_weights

    def spy(model, tensors, *args):
        def record():
            for name, t in tensors:
                seen.append(name)
                yield name, t
        return real(model, record(), *args)
    monkeypatch.setattr(loader, "load_weights", spy)
    llm = _llm(quantized) if source == "quantized" else _llm(wide, "int4")
    assert any(n.endswith("down_proj.qweight") for n in seen)
    assert not any(n.endswith("_proj.weight") for n in seen)
    assert "model.embed_tokens.weight" in seen and "lm_head.weight" in seen  # these stay full precision
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


@pytest.mark.slow
def test_quantizing_the_builtin_gguf_makes_it_smaller_with_normal_file_modes(tmp_path, capsys):
    """The built-in file stores its embedding as Q8_0: kept, it is quantized too (and said so), so the
    int4 copy is smaller than the GGUF file; --keep-embeddings keeps it whole (and larger)."""
    from keel.models.loader import resolve_model
    from keel.quant.cli import cmd_quantize
    source = os.path.getsize(resolve_model(None))
    out = str(tmp_path / "q4")
    args = argparse.Namespace(model=None, out=out, method="int4", group_size=None, quantize_embeddings=False,
                              keep_embeddings=False)
    assert cmd_quantize(args) == 0
    assert "embedding is quantized too: the source stored it as Q8_0" in capsys.readouterr().out
    # int4 groups of 32 with two 16-bit numbers each, as Q4_1; an int8 embedding as Q8_0: the same size
    # as the file, give or take the tokenizer written out as JSON (it was 1.9x before)
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    assert written < 1.02 * source, (written, source)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(out):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name
    llm = LLM(out, max_model_len=64, num_blocks=16)
    text = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert "Paris" in text
