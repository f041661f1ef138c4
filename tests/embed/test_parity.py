"""keel's embeddings against transformers plus the pooling the model's own files describe."""

from __future__ import annotations

import json
import os

import pytest
import torch

from keel.embed import EmbeddingModel
from keel.errors import ModelLoadError
from tests.embed.conftest import BUILTIN, hf_reference, make_tiny_bert, needs_builtin

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "Ünïcödé — 日本語のテキスト, русский язык, العربية 🚀🎉",
    " ".join(f"word{i}" for i in range(90)),  # well over 128 tokens: the tokenizer file's own truncation is off
    "a",
]


@pytest.fixture(scope="module")
def builtin():
    return EmbeddingModel()


@needs_builtin
def test_builtin_model_matches_transformers(builtin):
    ids = [builtin.encode(t) for t in TEXTS]
    assert max(len(i) for i in ids) > 128 and max(len(i) for i in ids) <= builtin.max_len == 256
    ours = builtin.embed(ids)  # one padded batch of very different lengths
    ref = hf_reference(BUILTIN, TEXTS)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() >= 0.9999, cos
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert builtin.name == "all-MiniLM-L6-v2" and builtin.dimensions == 384


@needs_builtin
def test_batching_does_not_change_vectors(builtin):
    texts = [f"sentence number {i} " + "and more " * (i % 13) for i in range(40)]
    ids = [builtin.encode(t) for t in texts]
    together = builtin.embed(ids)
    alone = torch.cat([builtin.embed([x]) for x in ids[:6]])
    assert torch.allclose(together[:6], alone, atol=1e-5)
    ref = hf_reference(BUILTIN, texts[:8])
    assert torch.nn.functional.cosine_similarity(together[:8], ref, dim=-1).min() >= 0.9999


@needs_builtin
@pytest.mark.parametrize("modes,normalize", [
    ({"cls_token": True}, False),
    ({"max_tokens": True, "mean_sqrt_len_tokens": True}, True),
    ({"mean_tokens": True, "cls_token": True}, False),
])
def test_pooling_files_are_followed(tmp_path, modes, normalize):
    folder = make_tiny_bert(str(tmp_path / "tiny"), modes, normalize)
    model = EmbeddingModel(folder)
    names = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len"}
    order = [m for m in ("cls", "lasttoken", "max", "mean", "mean_sqrt_len") if m in {names[k] for k in modes}]
    ours = model.embed([model.encode(t) for t in TEXTS[:3]])
    ref = hf_reference(folder, TEXTS[:3], order, normalize)
    assert ours.shape == ref.shape == (3, 48 * len(order))
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@needs_builtin
def test_no_sentence_transformers_files_means_mean_pooling(tmp_path):
    folder = make_tiny_bert(str(tmp_path / "plain"), None, False)
    model = EmbeddingModel(folder)
    ours = model.embed([model.encode(TEXTS[1])])
    assert torch.allclose(ours, hf_reference(folder, TEXTS[1:2], ("mean",), False), atol=1e-4)
    assert model.max_len == 64  # max_position_embeddings, with no sentence_bert_config.json


@needs_builtin
def test_broken_folders_are_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        EmbeddingModel(str(tmp_path / "nope"))
    folder = make_tiny_bert(str(tmp_path / "bad"), {"mean_tokens": True}, True)
    modules = json.load(open(os.path.join(folder, "modules.json")))
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    json.dump(modules, open(os.path.join(folder, "modules.json"), "w"))
    with pytest.raises(ModelLoadError, match="Dense"):
        EmbeddingModel(folder)
    folder = make_tiny_bert(str(tmp_path / "trunc"), None, False)
    weights = os.path.join(folder, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        EmbeddingModel(folder)
    config = json.load(open(os.path.join(folder, "config.json")))
    config["model_type"] = "t5"
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ModelLoadError, match="not supported as an embedding model"):
        EmbeddingModel(folder)
