"""Shared fixtures. Everything is built locally: no network, no model hub."""

from __future__ import annotations

import functools
import json
import os
import tempfile

import pytest

# A `keel serve` started by a test keeps stored responses in memory, never in the user's state file.
os.environ["KEEL_STATE_DB"] = ":memory:"
# ... and its uploads, jobs and adapters in a folder of its own, never in the user's data folder.
os.environ["KEEL_DATA_DIR"] = tempfile.mkdtemp(prefix="keel-test-data-")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mixed scripts so that the byte-level BPE learns tokens holding parts of multi-byte characters.
_CORPUS = [
    "Hello world! The café serves crème brûlée, and the naïve résumé reader orders a smörgåsbord.",
    "The quick brown fox jumps over the lazy dog. A user asks; the assistant answers; the system listens.",
    "日本語のテキストも少し入れます。東京は日本の首都です。今日は良い天気ですね。",
    "Emoji time 😀🎉👍🏽 and flags 🇫🇷🇯🇵, plus math ∑ ≤ ∞ and arrows → ←.",
    "Ünïcödé strings: Ελληνικά, русский язык, العربية, 한국어, and plain ASCII numbers 0123456789.",
    "Once upon a time there was a tiny language model that could only say a few words, "
    "but it said them with great confidence and a lot of punctuation: (!?), [..], {;}.",
    "def hello(name):\n    return f'Hello, {name}!'\n\nprint(hello('world'))\n",
]


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so any text (and any random id sequence) can be represented.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 2, trainer)
    return tok.to_str()


def make_tiny_tokenizer(folder) -> str:
    """Write a tiny byte-level BPE tokenizer (vocab <= 512, ChatML special tokens and chat
    template) into `folder`, like a model folder would hold it. Returns the folder."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(_tiny_tokenizer_json())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run hundreds of small ops per step. On a 2-core machine shared with other jobs, two
    OpenMP threads make every op wait at a barrier for a descheduled thread (measured: the 1000-adapter
    test 16 s with two threads against 1.3 s with one); one thread is also as fast when the machine is
    idle. A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_tokenizer_dir(tmp_path) -> str:
    return make_tiny_tokenizer(tmp_path / "tiny_tokenizer")
