import datetime
import json
import os

import pytest
from tokenizers import processors

from keel.errors import InvalidRequestError, ModelLoadError
from keel.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "The café serves crème brûlée.",
    "日本語のテキスト",
    "Emoji 😀🎉👍🏽 and flags 🇫🇷",
    "  leading and trailing spaces  \n\ttabs\n",
    "unseen words: Zzyzx qwertyuiop ⊕ ☃",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Bonjour, ça va? 日本語 😀"},
    {"role": "assistant", "content": "Oui."},
    {"role": "user", "content": "<tags> & \"quotes\""},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo <actuelle> & prévisions",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

# Exercises the features real templates use: bos_token, tools|tojson with indent, namespace,
# loop controls, the {% generation %} tag, raise_exception and whitespace control.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% continue %}{% endif %}
    {%- if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
    {%- if loop.index0 == 1 and ns.system %}[SYS]{{ ns.system }}[/SYS]
{% endif %}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}<a>{{ message['content'] | trim }}</a>{{ eos_token }}{% endgeneration %}
    {%- else %}
<u>{{ message['content'] }}</u>
    {%- endif %}
{%- endfor %}
{%- if tools %}
TOOLS: {{ tools | tojson(indent=4) }}
compact: {{ tools[0] | tojson }}
{%- endif %}
{%- if add_generation_prompt %}<a>{% endif %}"""

# A template that walks content parts itself, like multimodal ones do.
PARTS_TEMPLATE = """{% for m in messages %}{{ m.role }}:
{%- if m.content is string %} {{ m.content }}{% else %}{% for p in m.content %} [{{ p.type }}] {{ p.text }}{% endfor %}{% endif %}
{% endfor %}"""


@pytest.fixture
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_folder(tiny_tokenizer_dir)


def _chatml_template(folder):
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        return json.load(f)["chat_template"]


def _hf(folder, template, **special):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), **special)
    hf.chat_template = template
    return hf


def _write_config(folder, **changes):
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_and_special_tokens(tok):
    assert tok.vocab_size <= 512
    assert tok.vocab_size == 500
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert set(tok.all_special_ids) == {tok.token_to_id("<|endoftext|>"), im_start, im_end}
    assert tok.eos_token_ids == [im_end]
    assert tok.bos_token_id is None
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.id_to_token(im_end) == "<|im_end|>"


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        Tokenizer.from_folder(str(tmp_path))


def test_broken_tokenizer_config(tiny_tokenizer_dir):
    with open(os.path.join(tiny_tokenizer_dir, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tiny_tokenizer_dir)


def test_chat_template_jinja_file_wins(tiny_tokenizer_dir):
    with open(os.path.join(tiny_tokenizer_dir, "chat_template.jinja"), "w") as f:
        f.write("FROM FILE {{ messages[0]['content'] }}")
    tok = Tokenizer.from_folder(tiny_tokenizer_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "FROM FILE x"


def test_list_form_chat_template(tiny_tokenizer_dir):
    _write_config(
        tiny_tokenizer_dir,
        chat_template=[
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ messages | length }}"},
        ],
    )
    tok = Tokenizer.from_folder(tiny_tokenizer_dir)
    assert tok.apply_chat_template(MESSAGES) == "DEFAULT 4"


def test_dict_form_special_tokens_and_generation_config(tiny_tokenizer_dir):
    _write_config(
        tiny_tokenizer_dir,
        bos_token={"content": "<|endoftext|>", "lstrip": False, "special": True},
        eos_token={"content": "<|im_end|>", "rstrip": False},
    )
    tok = Tokenizer.from_folder(tiny_tokenizer_dir, generation_config={"eos_token_id": [0, 1]})
    assert tok.bos_token == "<|endoftext|>" and tok.bos_token_id == 0
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids == [0, 1, 2]
    tok = Tokenizer.from_folder(tiny_tokenizer_dir, generation_config={"eos_token_id": 2})
    assert tok.eos_token_ids == [2]


def test_generation_config_json_is_read_when_not_given(tiny_tokenizer_dir):
    with open(os.path.join(tiny_tokenizer_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [0]}, f)
    assert Tokenizer.from_folder(tiny_tokenizer_dir).eos_token_ids == [0, 2]


@pytest.mark.parametrize(
    "template, kwargs",
    [
        (None, {}),  # the fixture's ChatML template
        (RICH_TEMPLATE, {}),
        (RICH_TEMPLATE, {"tools": TOOLS}),
        (RICH_TEMPLATE, {"add_generation_prompt": False}),
    ],
)
def test_chat_template_matches_transformers(tiny_tokenizer_dir, template, kwargs):
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    template = template or _chatml_template(tiny_tokenizer_dir)
    _write_config(tiny_tokenizer_dir, chat_template=template, **special)
    tok = Tokenizer.from_folder(tiny_tokenizer_dir)
    kwargs = {"add_generation_prompt": True, **kwargs}
    expected = _hf(tiny_tokenizer_dir, template, **special).apply_chat_template(MESSAGES, tokenize=False, **kwargs)
    assert tok.apply_chat_template(MESSAGES, **kwargs) == expected


def test_content_parts_kept_for_templates_that_walk_them(tiny_tokenizer_dir):
    _write_config(tiny_tokenizer_dir, chat_template=PARTS_TEMPLATE)
    tok = Tokenizer.from_folder(tiny_tokenizer_dir)
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    expected = _hf(tiny_tokenizer_dir, PARTS_TEMPLATE).apply_chat_template(messages, tokenize=False)
    assert tok.apply_chat_template(messages) == expected == "user: [text] a [text] b"


def test_content_parts_flattened_for_string_templates(tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(messages) == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(InvalidRequestError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_none_valued_keys_are_dropped(tiny_tokenizer_dir):
    template = "{% for m in messages %}{{ m.role }}={{ m.content if 'content' in m else 'missing' }};{% endfor %}"
    _write_config(tiny_tokenizer_dir, chat_template=template)
    tok = Tokenizer.from_folder(tiny_tokenizer_dir)
    assert tok.apply_chat_template([{"role": "assistant", "content": None}]) == "assistant=missing;"


def test_raise_exception_becomes_invalid_request(tiny_tokenizer_dir):
    _write_config(tiny_tokenizer_dir, chat_template=RICH_TEMPLATE)
    tok = Tokenizer.from_folder(tiny_tokenizer_dir)
    with pytest.raises(InvalidRequestError, match="bad role tool"):
        tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


def test_template_errors_become_invalid_request(tiny_tokenizer_dir):
    _write_config(tiny_tokenizer_dir, chat_template="{% for m in messages %}")
    with pytest.raises(InvalidRequestError, match="not valid Jinja"):
        Tokenizer.from_folder(tiny_tokenizer_dir).apply_chat_template(MESSAGES)
    _write_config(tiny_tokenizer_dir, chat_template="{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidRequestError, match="could not render"):
        Tokenizer.from_folder(tiny_tokenizer_dir).apply_chat_template(MESSAGES)


def test_no_chat_template(tiny_tokenizer_dir):
    _write_config(tiny_tokenizer_dir, chat_template=None)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer.from_folder(tiny_tokenizer_dir).apply_chat_template(MESSAGES)


def test_template_globals_and_tojson(tiny_tokenizer_dir):
    template = "{{ strftime_now('%Y') }}|{{ messages | tojson }}|{{ custom }}"
    _write_config(tiny_tokenizer_dir, chat_template=template)
    tok = Tokenizer.from_folder(tiny_tokenizer_dir)
    out = tok.apply_chat_template([{"role": "user", "content": "<é>"}], custom="kw")
    year = str(datetime.datetime.now().year)
    assert out == year + '|[{"role": "user", "content": "<é>"}]|kw'


def test_sandbox_blocks_python_internals(tiny_tokenizer_dir):
    _write_config(tiny_tokenizer_dir, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        Tokenizer.from_folder(tiny_tokenizer_dir).apply_chat_template(MESSAGES)


def _bos_tokenizer(folder, post_processor_adds_bos: bool, add_bos: bool):
    inner = Tokenizer.from_folder(folder)._tok
    if post_processor_adds_bos:
        inner.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    return Tokenizer(
        inner,
        chat_template="{{ bos_token }}" + _chatml_template(folder),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        eos_token_ids=[2],
        add_bos=add_bos,
    )


@pytest.mark.parametrize("post_processor_adds_bos, add_bos", [(True, False), (False, True), (True, True)])
def test_bos_added_once(tiny_tokenizer_dir, post_processor_adds_bos, add_bos):
    tok = _bos_tokenizer(tiny_tokenizer_dir, post_processor_adds_bos, add_bos)
    hello = tok.encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == [0] + hello
    # Text that already starts with the bos token does not get a second one.
    assert tok.encode("<|endoftext|>hello") == [0] + hello
    assert tok.encode("hello", add_special_tokens=False) == hello
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert prompt.startswith("<|endoftext|><|im_start|>")
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[0] == 0 and ids[1] == tok.token_to_id("<|im_start|>")


def test_truncation_and_padding_in_tokenizer_json_are_ignored(tiny_tokenizer_dir):
    inner = Tokenizer.from_folder(tiny_tokenizer_dir)._tok
    inner.enable_truncation(max_length=3)
    inner.enable_padding(length=64)
    inner.save(os.path.join(tiny_tokenizer_dir, "tokenizer.json"))
    tok = Tokenizer.from_folder(tiny_tokenizer_dir)
    text = "The quick brown fox jumps over the lazy dog."
    assert tok.decode(tok.encode(text)) == text


def test_max_len_refuses_long_text_with_its_count(tok):
    from keel.tokenizer import PromptTooLongError
    text = "hello world " * 50
    ids = tok.encode(text)
    assert tok.encode(text, max_len=len(ids)) == ids
    with pytest.raises(PromptTooLongError) as e:
        tok.encode(text, max_len=len(ids) - 1)
    assert e.value.num_tokens >= len(ids) - 1


def test_encode_matches_the_tokenizers_own_encode(tok):
    """keel encodes through encode_batch_fast (it releases the GIL): the same ids as encode."""
    for text in ["hello world", "Ünïcödé — 日本語 🚀", "  spaces  and\nnewlines\t", "<|im_start|>user"]:
        for special in (True, False):
            assert tok._encode_ids(text, special) == tok._tok.encode(text, add_special_tokens=special).ids
