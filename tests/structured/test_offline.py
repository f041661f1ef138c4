"""Structured outputs through the offline API on the built-in model, sampled at temperature 1."""

from __future__ import annotations

import json

import jsonschema
import pytest

from keel import SamplingParams
from keel.engine.guided import GrammarBackend, StructuredOutputError
from keel.errors import InvalidRequestError
from tests.structured.conftest import BAD_SCHEMAS, PERSON, PROMPT

# the built-in model behind every test here: the full suite runs them, the fast tier does not
pytestmark = pytest.mark.slow

SEEDS = range(10)


@pytest.fixture(scope="module")
def batch(llm):
    """One generate call mixing the kinds of request, so masks are applied to some rows of a batch only."""
    object_prompt = [{"role": "user", "content": "Reply in JSON: what is the capital of France?"}]
    kinds = ([("schema", PROMPT, SamplingParams(temperature=1.0, seed=s, max_tokens=128, json_schema=PERSON))
              for s in SEEDS]
             + [("object", object_prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=128, json_object=True))
                for s in SEEDS]
             + [("free", PROMPT, SamplingParams(temperature=1.0, seed=s, max_tokens=32)) for s in range(4)])
    # A +100 bias on a token the grammar forbids at every position (compact JSON has no raw newline,
    # in strings or between tokens): the mask must still win.
    word = llm.tokenizer.encode("\n", add_special_tokens=False)[0]
    kinds.append(("biased", object_prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=128, json_object=True,
                                                          logit_bias={word: 100.0})))
    outs = llm.chat([prompt for _, prompt, _ in kinds], [p for _, _, p in kinds])
    by_kind: dict[str, list] = {}
    for (kind, _, _), out in zip(kinds, outs):
        by_kind.setdefault(kind, []).append(out.outputs[0])
    return by_kind


def test_json_schema_outputs_parse_and_validate(batch, llm):
    eos = set(llm.engine.tokenizer.eos_token_ids)
    for o in batch["schema"]:
        jsonschema.validate(json.loads(o.text), PERSON)
        # the request ends when the grammar does, without a step for the end-of-sequence token
        assert o.finish_reason == "stop" and o.token_ids[-1] not in eos, o


def test_json_object_outputs_are_objects(batch):
    for o in batch["object"] + batch["biased"]:
        assert isinstance(json.loads(o.text), dict), o.text
        assert o.finish_reason == "stop"


def test_unconstrained_rows_in_the_same_batch_are_not_masked(batch):
    def is_json(text: str) -> bool:
        try:
            json.loads(text)
            return True
        except ValueError:
            return False
    # SmolLM2 answers this prompt with prose when free; masks leaking across rows would make it JSON
    assert not all(is_json(o.text) for o in batch["free"])


def test_same_seed_same_structured_output(llm, batch):
    out = llm.chat(PROMPT, SamplingParams(temperature=1.0, seed=3, max_tokens=128, json_schema=PERSON))
    assert out[0].outputs[0].text == batch["schema"][3].text  # alone or in a batch of 25


def test_grammar_masks_reach_a_runner_behind_a_queue(llm, batch):
    """The grammar state stays with the engine; the runner gets each step's bitmasks as plain data."""
    from tests.engine.test_runner_contract import behind_a_queue
    runner = llm.engine.runner
    queued = behind_a_queue(llm)
    try:
        outs = llm.chat([PROMPT] * 3, [SamplingParams(temperature=1.0, seed=s, max_tokens=128, json_schema=PERSON)
                                        for s in range(3)])
    finally:
        llm.engine.runner = runner
        queued.close()
    assert [o.outputs[0].text for o in outs] == [o.text for o in batch["schema"][:3]]
    assert any(s.grammar_bitmask for s in queued.steps)


@pytest.mark.parametrize("schema, word", BAD_SCHEMAS)
def test_bad_schema_is_refused_and_names_the_problem(llm, schema, word):
    with pytest.raises(InvalidRequestError, match=word):
        llm.generate("Hi", SamplingParams(json_schema=schema, max_tokens=4))
    assert not llm.engine.has_unfinished_requests()


def test_schema_text_and_conflicting_options(llm):
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        llm.generate("Hi", SamplingParams(json_schema="{'type': 'object'", max_tokens=4))
    with pytest.raises(InvalidRequestError, match="only one of"):
        SamplingParams(json_schema={"type": "object"}, json_object=True)
    out = llm.generate("Hi", SamplingParams(json_schema=json.dumps({"enum": ["yes", "no"]}), seed=1, max_tokens=8))
    assert json.loads(out[0].outputs[0].text) in ("yes", "no")


def test_compiled_grammars_are_cached(llm):
    backend: GrammarBackend = llm.engine.structured
    first = backend.guide_for(SamplingParams(json_schema=PERSON))
    size = len(backend._cache)
    second = backend.guide_for(SamplingParams(json_schema=dict(PERSON)))
    assert len(backend._cache) == size and first.matcher is not second.matcher  # same text, own state


@pytest.mark.parametrize("seed", [3, 7])
def test_grammar_trigger_constrains_only_what_follows_it(llm, seed):
    """grammar_trigger (tool_choice "auto"): the output runs free until it contains the trigger, then
    what follows is held to the grammar. The trigger is taken from the free output of the same seed, so
    the model certainly writes it; the text before it must be unchanged."""
    prompt = [{"role": "user", "content": "Tell me about Paris in one sentence."}]
    free = llm.chat(prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=24))[0].outputs[0].text
    trigger = free[:free.index(" ", 3)]  # the first word or two
    grammar = 'start: " " %json {"type": "object", "properties": {"n": {"type": "integer"}}, ' \
              '"required": ["n"], "additionalProperties": false}\n'
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=64, grammar=grammar, grammar_trigger=trigger)
    out = llm.chat(prompt, params)[0].outputs[0]
    assert out.text.startswith(trigger), (trigger, out.text)
    rest = out.text[len(trigger):]
    assert rest.startswith(" ") and set(json.loads(rest)) == {"n"}, out.text
    assert out.finish_reason == "stop"


def test_grammar_trigger_needs_a_grammar():
    with pytest.raises(InvalidRequestError, match="grammar_trigger"):
        SamplingParams(grammar_trigger="<tool_call>")
