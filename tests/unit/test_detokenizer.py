import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from keel.engine.detokenizer import IncrementalDetokenizer
from keel.tokenizer import Tokenizer

TEXT = (
    "Hello world! The café serves crème brûlée. 日本語のテキスト 😀🎉👍🏽 and flags 🇫🇷, "
    "plus math ∑ ≤ ∞. The quick brown fox jumps over the lazy dog."
)


@pytest.fixture
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_folder(tiny_tokenizer_dir)


def run(detok, ids, rng=None, max_step=1):
    """Feed ids in steps of 1..max_step tokens, calling get_delta after each, like the engine
    does while streaming. Returns the deltas (the last one from after finish())."""
    rng = rng or random.Random(0)
    deltas, i = [], 0
    while i < len(ids) and not detok.finished:
        step = rng.randint(1, max_step)
        detok.update(ids[i : i + step])
        deltas.append(detok.get_delta())
        i += step
    detok.finish()
    deltas.append(detok.get_delta())
    return deltas


def assert_never_ahead(deltas, final):
    """Every streamed prefix is a prefix of the final text: nothing (e.g. half a stop string)
    was sent that the final text does not contain."""
    streamed = ""
    for d in deltas:
        streamed += d
        assert final.startswith(streamed)
    assert streamed == final


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_match_full_decode(tok, skip_special_tokens):
    rng = random.Random(1234)
    for _ in range(300):
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 8))]
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 40))]
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
        deltas = run(detok, ids, rng, max_step=3)
        full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == detok.output_text == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_never_cut(tok):
    ids = tok.encode(TEXT)
    # The tiny vocabulary must split some characters across tokens, or this test proves nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok, tok.encode("<|im_start|>assistant\n"))
    deltas = run(detok, ids)
    assert "".join(deltas) == detok.output_text == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > len(ids) // 2  # streamed as it goes, not at the end


def test_incomplete_character_is_held_until_finish(tok):
    ids = tok.encode("ok 😀")
    partial = ids[:-1]  # the emoji's last byte is missing
    assert tok.decode(partial).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [])
    detok.update(partial)
    before = detok.get_delta()
    assert before in ("ok", "ok ")  # the space may share a token with the emoji's first bytes
    detok.finish()
    assert before + detok.get_delta() == detok.output_text == tok.decode(partial)


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("日本語 ok")
    for split in range(1, len(ids)):
        detok = IncrementalDetokenizer(tok, ids[:split])
        deltas = run(detok, ids[split:])
        assert "".join(deltas) == detok.output_text == tok.decode(ids[split:])


def _stop_cases(tok, rng, n):
    """(text ids, stop) pairs where the stop string starts inside one token and ends in another."""
    ids = tok.encode(TEXT)
    pieces = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    cases = []
    while len(cases) < n:
        k = rng.randrange(1, len(ids) - 2)
        start, end = len(pieces[k]) - rng.randint(1, 2), len(pieces[k + 1]) + rng.randint(1, 2)
        stop = TEXT[start:end]
        if "\ufffd" not in pieces[k] + pieces[k + 1] and start >= 0 and len(stop) >= 2:
            cases.append((ids, stop))
    return cases


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_across_token_boundaries(tok, include_stop):
    rng = random.Random(7)
    for ids, stop in _stop_cases(tok, rng, 60):
        index = TEXT.find(stop)
        expected = TEXT[: index + len(stop)] if include_stop else TEXT[:index]
        detok = IncrementalDetokenizer(tok, [], stop=[stop, "never occurs"], include_stop_str_in_output=include_stop)
        deltas = run(detok, ids, rng, max_step=3)
        assert detok.stop_str == stop
        assert detok.output_text == expected
        assert_never_ahead(deltas, expected)


def test_update_returns_stop_and_ignores_later_tokens(tok):
    ids = tok.encode("one two three four")
    detok = IncrementalDetokenizer(tok, [], stop=["three"])
    results = [detok.update([i]) for i in ids]
    assert results.count("three") == 1 and results[-1] is None
    assert detok.output_text == "one two "
    detok.finish()
    assert detok.get_delta() == "one two "


def test_stop_string_at_the_very_start(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["Hello"])
    deltas = run(detok, tok.encode("Hello world"))
    assert detok.output_text == "" and "".join(deltas) == ""
    detok = IncrementalDetokenizer(tok, [], stop=["Hello"], include_stop_str_in_output=True)
    deltas = run(detok, tok.encode("Hello world"))
    assert detok.output_text == "Hello" == "".join(deltas)


def test_earliest_stop_wins_within_one_update(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["fox", "brown"])
    assert detok.update(tok.encode("The quick brown fox jumps")) == "brown"
    assert detok.output_text == "The quick "


def test_multibyte_stop_string(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["本語"])
    deltas = run(detok, tok.encode(TEXT))
    assert detok.output_text == TEXT[: TEXT.find("本語")]
    assert_never_ahead(deltas, detok.output_text)


def test_only_possible_stop_starts_are_held_back(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["lazy dog"])
    detok.update(tok.encode("a lazy"))
    assert detok.get_delta() == "a "  # "lazy" may become "lazy dog"
    detok.update(tok.encode(" cat"))
    assert detok.get_delta() == "lazy cat"
    detok.update(tok.encode(" l"))
    assert detok.get_delta() == " "
    detok.finish()
    assert detok.get_delta() == "l"  # no more tokens: nothing can complete the stop string
    assert detok.stop_str is None and detok.output_text == "a lazy cat l"


def test_random_stop_strings(tok):
    """Stops drawn from the text at random offsets, checked against plain str.find."""
    rng = random.Random(99)
    for _ in range(200):
        start = rng.randrange(len(TEXT) - 1)
        stop = TEXT[start : start + rng.randint(1, 6)]
        index = TEXT.find(stop)
        detok = IncrementalDetokenizer(tok, [], stop=[stop])
        deltas = run(detok, tok.encode(TEXT), rng, max_step=4)
        assert detok.output_text == TEXT[:index]
        assert_never_ahead(deltas, TEXT[:index])


def test_skipped_special_tokens_and_eos(tok):
    im_end = tok.token_to_id("<|im_end|>")
    ids = tok.encode("café") + [im_end]
    detok = IncrementalDetokenizer(tok, [], stop=["<|im_end|>"])
    assert "".join(run(detok, ids)) == "café" and detok.stop_str is None
    # With special tokens shown, a stop string can match one.
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(run(detok, ids)) == "café" and detok.stop_str == "<|im_end|>"


def test_work_per_token_is_bounded(tok):
    """Each step decodes a window of a few tokens, not the whole output."""
    sizes = []
    decode = tok.decode

    def recording_decode(ids, skip_special_tokens=True):
        sizes.append(len(ids))
        return decode(ids, skip_special_tokens)

    tok.decode = recording_decode
    ids = tok.encode(TEXT) * 40
    detok = IncrementalDetokenizer(tok, ids[:50], stop=["zzz"])
    run(detok, ids)
    assert detok.output_text == TEXT * 40
    assert max(sizes) <= 16


@pytest.fixture(scope="module")
def metaspace_tok():
    """A sentencepiece-style tokenizer: spaces become '▁' and the decoder drops the leading
    space of the first token it is given."""
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    inner.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False)
    inner.train_from_iterator([TEXT, "The capital of France is Paris."] * 3, trainer)
    return Tokenizer(inner, chat_template=None, bos_token=None, eos_token="</s>", eos_token_ids=[0])


def test_sentencepiece_leading_spaces(metaspace_tok):
    tok = metaspace_tok
    prompt = tok.encode("The capital of France is")
    output = tok.encode("The capital of France is Paris. The quick brown fox")[len(prompt) :]
    assert tok.decode(output) == "Paris. The quick brown fox"  # decoded alone: leading space lost
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = run(detok, output)
    # In context, the first token keeps its space, so prompt + output reads correctly.
    assert "".join(deltas) == detok.output_text == " Paris. The quick brown fox"
    # Without a prompt there is no context, and the text equals a plain decode.
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(run(detok, output)) == "Paris. The quick brown fox"
