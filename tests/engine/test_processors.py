"""The engine's input and output processors on their own, with a real tokenizer and no model."""

from __future__ import annotations

import pytest

from keel.engine.guided import GrammarBackend
from keel.engine.input_processor import InputProcessor
from keel.engine.outputs import RunnerOutput, TokenLogprobs
from keel.engine.output_processor import OutputProcessor
from keel.errors import InvalidRequestError
from keel.sampling_params import SamplingParams
from keel.tokenizer import Tokenizer

MAX_LEN = 32


@pytest.fixture
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_folder(tiny_tokenizer_dir)


@pytest.fixture
def inputs(tok):
    return InputProcessor(tok, tok.vocab_size, (0,), GrammarBackend(tok, tok.vocab_size), MAX_LEN)


def test_fan_out_gives_each_choice_its_own_seed_and_waits_on_the_first(inputs, tok):
    r = inputs.process("r", "Hello world", SamplingParams(n=3, seed=10, max_tokens=100), None)
    assert r.prompt == "Hello world" and r.prompt_token_ids == tok.encode("Hello world")
    assert [c.request_id for c in r.children] == ["r#0", "r#1", "r#2"]
    assert [c.params.seed for c in r.children] == [10, 11, 12]
    assert [c.wait_for for c in r.children] == [None, "r#0", "r#0"]
    assert {c.max_tokens for c in r.children} == {MAX_LEN - len(r.prompt_token_ids)}  # capped by the context


@pytest.mark.parametrize("prompt, params, word", [
    ([], SamplingParams(), "empty"),
    ([5, 10**6], SamplingParams(), "outside the vocabulary"),
    (list(range(3, 3 + MAX_LEN)), SamplingParams(), "context"),
    ([5], SamplingParams(top_k=10**6), "top_k"),
    ([5], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ([5], SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
])
def test_bad_input_is_refused_and_named(inputs, prompt, params, word):
    with pytest.raises(InvalidRequestError, match=word):
        inputs.process("r", prompt, params, None)


def test_a_grammar_is_compiled_per_choice_and_deferred_by_a_trigger(inputs):
    r = inputs.process("r", [5, 6], SamplingParams(n=2, json_object=True, max_tokens=8), None)
    guides = [c.guide for c in r.children]
    assert all(g is not None for g in guides) and guides[0] is not guides[1]
    lazy = inputs.process("s", [5, 6], SamplingParams(grammar="start: \"a\"", grammar_trigger="<x>", max_tokens=8), None)
    assert lazy.children[0].guide is None and lazy.children[0].trigger_scan == 0


class Finished:
    def __init__(self) -> None:
        self.calls = []

    def __call__(self, rid, reason, stop):
        self.calls.append((rid, reason, stop))


def test_output_processor_detokenizes_stops_and_reports_logprobs(inputs, tok):
    finish = Finished()
    outputs = OutputProcessor(tok, inputs.structured, finish)
    params = SamplingParams(max_tokens=20, stop=["world"], logprobs=1)
    r = inputs.process("r", "Hi", params, None)
    group = outputs.add("r", r.prompt, r.prompt_token_ids, r.children, None)
    child = r.children[0]
    text = []
    for t in tok.encode(" hello world again", add_special_tokens=False):
        child.output_token_ids.append(t)
        out = RunnerOutput({child.request_id: t}, {child.request_id: TokenLogprobs(-0.5, [(t, -0.5)])})
        [(g, error)] = outputs.process([child], out)
        assert g is group and error is None
        emitted = outputs.emit(group)
        text.append(emitted.outputs[0].delta_text)
        if finish.calls:
            break
    assert finish.calls == [("r#0", "stop", "world")]  # the scheduler is told to end it
    assert "".join(text) == " hello "  # the stop string is cut, and nothing after it is sent
    lps = emitted.outputs[0].logprobs
    assert len(lps) == len(emitted.outputs[0].token_ids) and all(lp.logprob == -0.5 for lp in lps)


def test_a_failed_request_keeps_its_tokens_and_is_dropped(inputs, tok):
    outputs = OutputProcessor(tok, inputs.structured, Finished())
    r = inputs.process("r", [5, 6], SamplingParams(n=2, max_tokens=4), None)
    group = outputs.add("r", None, r.prompt_token_ids, r.children, None)
    r.children[0].output_token_ids.append(7)
    outputs.process([r.children[0]], RunnerOutput({"r#0": 7}))
    failed = outputs.failed(group, RuntimeError("boom"))
    outputs.drop(group)
    assert failed.finished and str(failed.error) == "boom"
    assert [o.finish_reason for o in failed.outputs] == ["abort", "abort"]
    assert failed.outputs[0].token_ids == [7] and outputs.group_of("r#0") is None and not outputs.groups
