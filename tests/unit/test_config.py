"""Config dataclasses are the single source of every engine option: each field is an option of the
commands that load a model (help text from its docstring) and a keyword of keel.LLM / LLMEngine, with
no code written for it; configs are frozen and the engine resolves its own copy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from keel import config as config_module
from keel.cli import build_parser
from keel.config import GROUPS, CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, engine_config
from keel.errors import InvalidRequestError
from keel.options import engine_config_from_args, field_docs


def help_of(*command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    p = sub.choices[command[0]]
    return " ".join(p.format_help().split())


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_field_is_a_serve_option_and_an_llm_keyword(group):
    text = help_of("serve")
    cls = GROUPS[group]
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flags = f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))
        assert flags[0] in text, f.name
        assert docs[f.name], f"{cls.__name__}.{f.name} has no docstring"
        assert " ".join(docs[f.name].split()[:4]) in text  # its docstring is its help
        value = getattr(engine_config(**{f.name: f.default}), group)
        assert getattr(value, f.name) == f.default


def test_a_new_field_appears_in_serve_help_and_the_offline_api(monkeypatch):
    @dataclass(frozen=True)
    class CacheWithKnob(CacheConfig):
        """KV cache."""
        test_only_knob: int = 3
        """A knob added for this test, seen by every command."""

    monkeypatch.setitem(GROUPS, "cache", CacheWithKnob)
    text = help_of("serve")
    assert "--test-only-knob TEST_ONLY_KNOB A knob added for this test, seen by every command." in text
    assert "--test-only-knob" in help_of("chat") and "--test-only-knob" in help_of("generate")
    assert engine_config(test_only_knob=5).cache.test_only_knob == 5
    args = build_parser().parse_args(["serve", "--test-only-knob", "7", "--block-size", "8"])
    cfg = engine_config_from_args(args)
    assert (cfg.cache.test_only_knob, cfg.cache.block_size) == (7, 8)


def test_options_parse_into_the_engine_config():
    args = build_parser().parse_args(["serve", "--max-num-seqs", "3", "--no-enable-prefix-caching", "--max-loras", "2",
                                      "--quantize", "int4", "--quantize-group-size", "64", "--kv-cache-memory", "0.5"])
    cfg = engine_config_from_args(args, enable_lora=True)
    assert cfg.scheduler == SchedulerConfig(max_num_seqs=3)
    assert cfg.cache == CacheConfig(enable_prefix_caching=False, kv_cache_memory_gb=0.5)
    assert cfg.lora == LoRAConfig(enable_lora=True, max_loras=2)
    assert (cfg.load.quantization, cfg.load.quantize_group_size) == ("int4", 64)
    with pytest.raises(SystemExit):  # argparse refuses a group size keel does not have
        build_parser().parse_args(["serve", "--quantize-group-size", "48"])


def test_unknown_and_misplaced_options_are_named():
    with pytest.raises(TypeError, match="max_num_seq.*did you mean 'max_num_seqs'"):
        engine_config(max_num_seq=4)
    with pytest.raises(TypeError, match="CacheConfig"):
        engine_config(cache=SchedulerConfig())
    with pytest.raises(InvalidRequestError, match="block_size=0"):
        engine_config(block_size=0)


def test_configs_are_frozen_and_whole_groups_are_accepted():
    cfg = engine_config(cache=CacheConfig(block_size=4), max_num_seqs=2, enable_lora=True, max_cpu_loras=None)
    assert cfg.cache.block_size == 4 and cfg.scheduler.max_num_seqs == 2 and cfg.lora.enable_lora
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cache.block_size = 8
    # a derived default follows the field it derives from
    assert engine_config(max_loras=5).lora.cpu_loras == 5
    assert engine_config(engine_config(max_loras=5), max_loras=7).lora.cpu_loras == 7
    assert EngineConfig() == engine_config()
    assert config_module.LoRAConfig().enable_lora is False
