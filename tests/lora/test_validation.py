"""Every kind of bad adapter is refused with its reason, and the engine then serves a correct request."""

from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from keel import LLM, SamplingParams
from keel.errors import LoRAError, LoRANotFoundError
from keel.lora import LoRARequest
from tests.lora.conftest import edit_config, hf_greedy, make_peft_adapter

PROMPT = list(range(10, 27))
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def env(lora_case, tmp_path_factory):
    ckpt, hf, adapters = lora_case("llama-gqa")
    root = tmp_path_factory.mktemp("bad")
    good_folder, good_peft = adapters["all-r8-rslora"]
    llm = LLM(ckpt, dtype="float32", num_blocks=128, block_size=4, enable_lora=True, max_loras=2, max_lora_rank=8)
    llm.add_lora("good", good_folder)
    expected = hf_greedy(good_peft, PROMPT, 12)

    def check_still_serving():
        out = llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("good"))[0]
        assert out.outputs[0].token_ids == expected
        assert llm.engine.pool.num_free == llm.engine.num_blocks  # nothing leaked by the failure

    def copy_good(name: str) -> str:
        dst = str(root / name)
        shutil.copytree(good_folder, dst)
        return dst
    return llm, hf, root, copy_good, check_still_serving, lora_case


def _bad_adapters(hf, root, copy_good, lora_case):
    """name -> (folder, expected message fragment), made lazily."""
    def missing():
        return str(root / "nope"), "does not exist"

    def a_file():
        p = str(root / "file.txt")
        open(p, "w").write("x")
        return p, "not a folder"

    def no_config():
        p = copy_good("noconfig")
        os.remove(os.path.join(p, "adapter_config.json"))
        return p, "adapter_config.json is missing"

    def bad_json():
        p = copy_good("badjson")
        open(os.path.join(p, "adapter_config.json"), "w").write("{r: 8,")
        return p, "cannot be parsed"

    def dora():
        return make_peft_adapter(hf, str(root / "dora"), 1, r=4, target_modules=["q_proj"], use_dora=True) and \
            str(root / "dora"), "DoRA"

    def bias():
        p = copy_good("bias")
        edit_config(p, bias="all")
        return p, "bias='all'"

    def modules_to_save():
        make_peft_adapter(hf, str(root / "mts"), 2, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
        return str(root / "mts"), "modules_to_save"

    def embedding():
        make_peft_adapter(hf, str(root / "emb"), 3, r=4, target_modules=["embed_tokens", "q_proj"])
        return str(root / "emb"), "token embedding"

    def lm_head():
        p = copy_good("lmhead")
        edit_config(p, target_modules=["q_proj", "lm_head"])
        return p, "output head"

    def unknown_target():
        p = copy_good("c_attn")
        edit_config(p, target_modules=["q_proj", "c_attn"])
        return p, "'c_attn' is not in the base model"

    def module_the_base_lacks():
        p = copy_good("layer7")
        f = os.path.join(p, "adapter_model.safetensors")
        t = load_file(f)
        save_file({k.replace("layers.1.", "layers.7."): v for k, v in t.items()}, f)
        return p, "model.layers.7.mlp.down_proj, which the base model does not have"

    def wrong_shape():
        _, _, other = lora_case("qwen3-qknorm")  # head_dim 32: q_proj has 128 rows, not 64
        p = str(root / "othershape")
        shutil.copytree(other["qv-r4"][0], p)
        edit_config(p, base_model_name_or_path=None)
        return p, "do not fit the base projection"

    def rank_too_big():
        _, _, ours = lora_case("llama-gqa")
        return ours["all-r16"][0], "over this server's max_lora_rank=8"

    def other_base():
        p = copy_good("otherbase")
        edit_config(p, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
        return p, "trained for base model 'meta-llama/Llama-2-7b-hf'"

    def rank_mismatch():
        p = copy_good("rankmismatch")
        edit_config(p, r=6, rank_pattern={})
        return p, "but adapter_config.json gives it rank 6"

    def pickle_only():
        p = copy_good("bin")
        os.rename(os.path.join(p, "adapter_model.safetensors"), os.path.join(p, "adapter_model.bin"))
        return p, "pickle"

    def truncated():
        p = copy_good("trunc")
        f = os.path.join(p, "adapter_model.safetensors")
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        return p, "cannot be read"

    def not_lora():
        p = copy_good("ia3")
        edit_config(p, peft_type="IA3")
        return p, "only LORA adapters"
    return {f.__name__: f for f in (missing, a_file, no_config, bad_json, dora, bias, modules_to_save, embedding,
                                    lm_head, unknown_target, module_the_base_lacks, wrong_shape, rank_too_big,
                                    other_base, rank_mismatch, pickle_only, truncated, not_lora)}


BAD = ["missing", "a_file", "no_config", "bad_json", "dora", "bias", "modules_to_save", "embedding", "lm_head",
       "unknown_target", "module_the_base_lacks", "wrong_shape", "rank_too_big", "other_base", "rank_mismatch",
       "pickle_only", "truncated", "not_lora"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_adapter_is_refused_at_load_then_engine_serves(env, kind):
    llm, hf, root, copy_good, check_still_serving, lora_case = env
    path, message = _bad_adapters(hf, root, copy_good, lora_case)[kind]()
    with pytest.raises(LoRAError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        llm.add_lora(f"bad-{kind}", path)
    assert f"bad-{kind}" not in {i.name for i in llm.list_loras()}  # a failed load registers nothing
    check_still_serving()
    # registered without loading, the same error comes with the first request that names it
    llm.engine.adapters.register(f"lazy-{kind}", path)
    with pytest.raises(LoRAError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest(f"lazy-{kind}"))
    llm.remove_lora(f"lazy-{kind}")
    check_still_serving()


def test_unknown_adapter_and_lora_off(env, lora_case):
    llm, _, _, _, check_still_serving, _ = env
    with pytest.raises(LoRANotFoundError, match="'nobody' is not registered"):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("nobody"))
    with pytest.raises(LoRANotFoundError):
        llm.remove_lora("nobody")
    with pytest.raises(LoRAError, match="already registered with another folder"):
        llm.add_lora("good", lora_case("llama-gqa")[2]["qv-r4"][0])
    check_still_serving()
    plain = LLM(lora_case("llama-gqa")[0], dtype="float32", num_blocks=32, block_size=4)
    with pytest.raises(LoRAError, match="serves no LoRA adapters"):
        plain.generate([PROMPT], GREEDY, lora_request=LoRARequest("good", lora_case("llama-gqa")[2]["qv-r4"][0]))
    assert plain.generate([PROMPT], GREEDY)[0].outputs[0].token_ids


def test_weights_that_break_after_validation_abort_only_their_requests(env):
    llm, _, _, copy_good, check_still_serving, _ = env
    p = copy_good("breaks-later")
    llm.engine.adapters.register("breaks-later", p)
    llm.engine.adapters.validate("breaks-later")  # header fine now
    f = os.path.join(p, "adapter_model.safetensors")
    t = load_file(f)
    save_file({k: v[:1] for k, v in t.items()}, f)  # same names, wrong shapes: the load fails later
    outs = llm.generate([PROMPT, PROMPT], GREEDY, lora_request=[LoRARequest("breaks-later"), LoRARequest("good")])
    assert outs[0].outputs[0].finish_reason == "abort" and outs[0].finished
    assert outs[1].outputs[0].finish_reason == "length"
    check_still_serving()


@pytest.mark.parametrize("targets,message", [
    (r".*\.(q_proj|v_proj)", None),
    ("all-linear", None),
    (r".*embed_tokens", "token embedding"),
    (r"model\.layers\.\d+\.foo", "matches no module"),
    ("[", "not a regular expression keel can match in linear time"),
    (r"(?=model).*q_proj", "no backreferences or look-around"),
    # catastrophic for a backtracking engine (2^n paths on a 30-character name); linear under RE2
    (r"(.|.)*X", "matches no module"),
    (r"(a|aa)*(a|aa)*(a|aa)*(a|aa)*(a|aa)*(a|aa)*b", "matches no module"),
    (["q_proj", "v_proj", "norm"], "only the attention and MLP projections"),
])
def test_target_modules_forms(env, targets, message):
    llm, _, _, copy_good, check_still_serving, _ = env
    from keel.lora.adapter import read_spec
    p = copy_good(f"targets-{abs(hash(str(targets)))}")
    edit_config(p, target_modules=targets)
    if message is None:
        read_spec("t", p, llm.engine.lora.base, 8)
    else:
        with pytest.raises(LoRAError, match=message):
            read_spec("t", p, llm.engine.lora.base, 8)


def test_base_model_name_check_is_lenient():
    from keel.lora.adapter import _same_base
    assert _same_base("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1")
    assert _same_base("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M-Instruct")
    assert _same_base("/tmp/x/llama-gqa/", "llama-gqa") and _same_base("", "anything")
    assert not _same_base("meta-llama/Llama-2-7b-hf", "SmolLM2-135M-Instruct")
