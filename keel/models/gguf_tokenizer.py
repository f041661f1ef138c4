"""The vocabulary a GGUF file embeds, as the `tokenizers.Tokenizer` the model's own Hugging Face tokenizer is.

A GGUF file holds no tokenizer.json, only llama.cpp's description of one (`tokenizer.ggml.*`): the token
strings, their types, and merges (byte-level BPE) or scores (SentencePiece). Two kinds are read:

- "gpt2", byte-level BPE: the merges are in the file; `tokenizer.ggml.pre` names the original tokenizer's
  split of the text (llama.cpp chose the name by hashing that tokenizer's output), rebuilt here as the
  tokenizer.json had it;
- "llama", SentencePiece (Llama 2, Mistral, Phi-3, Gemma): a BPE with byte fallback (a character outside
  the vocabulary becomes its UTF-8 bytes, the <0xNN> tokens) whose merges are not in the file: they are
  recovered from the vocabulary, every way of cutting a token into two tokens, best token first. That is
  llama.cpp's SentencePiece merging (llm_tokenizer_spm: repeatedly join the adjacent pair that makes the
  best-scoring token) expressed as ranked merges. Spaces become "▁" and a "▁" starts the text unless the
  file says `tokenizer.ggml.add_space_prefix` false.

Where llama.cpp and transformers (integrations/gguf) differ, this follows transformers, which rebuilds the
tokenizer the model was published with: Llama's and Mistral's "▁" starts the text but is not added again
after a special token (llama.cpp adds one after every special token), and Falcon's digits are split as its
tokenizer.json splits them (see _falcon_pre). Each family's SentencePiece setup is its tokenizer.json's:

- Llama, Mistral and others: the Metaspace pre-tokenizer, "▁" prepended to the start of the text only;
- Phi-3: a normalizer that prepends the "▁" to every stretch of text between special tokens and replaces
  spaces, so "  hi" keeps all three "▁";
- Gemma: no "▁" prepended; its file spells tokens of two or more spaces with real spaces, respelled with
  "▁" here; its scores do not rank its merges, the order of the tokens in the file does.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from keel.errors import ModelLoadError, UnsupportedModelError

# Split regexes of the original HF tokenizers, which llama.cpp names by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # the same but one digit per piece
_LLAMA3_PRE = ("llama3", "llama-bpe", "llama-v3")
_SPLIT_PRE = {**dict.fromkeys(_LLAMA3_PRE, _LLAMA3_SPLIT), "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
SPACE = "\u2581"  # SentencePiece's visible space
_GEMMA = ("gemma", "gemma2", "gemma3")
# Tokens transformers makes special by name, whatever their type (an unknown token is type 2, not control).
_NAMED = ("bos", "eos", "unknown", "padding")


def _falcon_pre() -> pre_tokenizers.PreTokenizer:
    """Falcon's tokenizer.json: runs of punctuation apart, GPT-2's split, then digit runs apart and cut
    into threes. llama.cpp's "falcon" regexes are the same but for the step that sets digit runs apart,
    which it leaves out (" 12" stays one piece there) and which here runs, as in the original, on
    byte-level text: a space before digits is "Ġ" and is split off, and so are the byte characters that
    are numbers (a UTF-8 continuation byte 0xBC shows as "¼")."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="contiguous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated"),
    ])


def gguf_tokenizer(meta: dict, arch: str, path: str) -> tuple[Tokenizer, list[str]]:
    """The file's tokenizer, with bos/eos added as its flags say, and its token strings by id."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta["tokenizer.ggml.tokens"]
    if kind == "gpt2":
        tok = _byte_level(meta, tokens, path)
    elif kind == "llama":
        tok = _sentencepiece(meta, tokens, arch, path)
    else:
        raise UnsupportedModelError(f"{path}: GGUF tokenizer model {kind!r} is not supported "
                                    "(byte-level BPE 'gpt2' and SentencePiece 'llama' are)")
    vocab = tok.get_vocab()
    # Otherwise "<|im_start|>" in a prompt would be cut into pieces instead of staying one token.
    types = meta.get("tokenizer.ggml.token_type") or []
    named = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in _NAMED}
    special = sorted({i for i, ty in enumerate(types) if ty == _CONTROL}
                     | {i for i in named if i is not None and 0 <= i < len(tokens)})
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    # A user-defined token the vocabulary spells otherwise (Gemma's runs of spaces) stays as spelled there.
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    # llama.cpp adds bos to a SentencePiece vocabulary whose file does not say otherwise.
    add = {"bos": meta.get("tokenizer.ggml.add_bos_token", kind == "llama"),
           "eos": meta.get("tokenizer.ggml.add_eos_token", False)}
    template, specials = "$A", []
    for key in ("bos", "eos"):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if add[key] and tid is not None:
            template = f"{tokens[tid]} {template}" if key == "bos" else f"{template} {tokens[tid]}"
            specials.append((tokens[tid], tid))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=template, pair=f"{template} {template.replace('$A', '$B:1')}", special_tokens=specials)
    return tok, tokens


def _byte_level(meta: dict, tokens: list[str], path: str) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre == "smollm":  # SmolLM's own tokenizer.json: single digits, then the GPT-2 split
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _SPLIT_PRE:
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("default", "gpt2", "mpt"):  # llama.cpp splits MPT's (GPT-NeoX's) text as GPT-2's
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "falcon":
        pre_tok = _falcon_pre()
    else:  # a guessed split would tokenize unlike training, quietly; refuse instead
        raise UnsupportedModelError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported")

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # some vocabs repeat a string; keep its first id
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        # Llama 3's tokenizer.json takes a piece that is a whole vocab entry before merging.
        model = models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRE)
    except Exception as e:
        raise ModelLoadError(f"{path}: GGUF vocabulary does not fit its merges: {e}") from e
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict, tokens: list[str], arch: str, path: str) -> Tokenizer:
    gemma = arch in _GEMMA
    if gemma:
        tokens = [t.replace(" ", SPACE) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated string keeps its last id, as llama.cpp's lookup
    scores = meta.get("tokenizer.ggml.scores")
    if "tokenizer.ggml.merges" in meta:  # rare, but then they are the tokenizer's own
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    elif gemma:  # earlier is better; a repeated string takes its last position, as it takes its last id
        merges = spm_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    elif scores is not None and len(scores) == len(tokens):
        merges = spm_merges(vocab, dict(zip(tokens, scores)))
    else:
        raise ModelLoadError(f"{path}: a SentencePiece GGUF vocabulary needs one tokenizer.ggml.scores entry per token")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    try:
        # The unknown token only stands in for a byte the vocabulary lacks a <0xNN> token for.
        model = models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True,
                           unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None)
    except Exception as e:
        raise ModelLoadError(f"{path}: GGUF SentencePiece vocabulary is not usable: {e}") from e
    tok = Tokenizer(model)

    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True)) and not gemma
    if gemma or arch == "phi3":  # a normalizer, so every stretch of text between special tokens is escaped
        steps = [normalizers.Prepend(SPACE)] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    else:  # "first": the "▁" starts the text, not each stretch after a special token
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first" if prefix else "never",
                                                     split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # the space the prefix stands for is not the text's
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def spm_merges(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges that join pieces as SentencePiece does: every cut of a token into two tokens, ranked by
    the token's priority (its score), best first; ties go to the longer left piece, then the longer right
    one, then the order of the tokens and of the pieces' ids (transformers' order, so ties break alike)."""
    cuts = []
    for token, score in priority.items():
        found = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        found.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        cuts.extend((-score, -len(left), -len(right), left, right) for left, right in found)
    cuts.sort(key=lambda c: c[:3])  # stable: equal keys keep the order above
    return [(left, right) for *_, left, right in cuts]
