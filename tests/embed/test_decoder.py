"""Decoder embedding models (Qwen3-Embedding style: the decoder saved without its head, pooled at the
last token and normalised) through keel's own decoder, against transformers' base model."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from keel.embed import EmbeddingModel
from tests.models.conftest import make_checkpoint


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec_embed")
    full = str(root / "full")
    hf = make_checkpoint(full, "qwen3-qknorm")
    folder = str(root / "tiny-qwen3-embedding")
    hf.model.save_pretrained(folder)  # Qwen3Model: tensors without "model.", no lm_head
    for f in glob.glob(os.path.join(full, "*.json")):
        if os.path.basename(f) not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, folder)
    os.makedirs(os.path.join(folder, "1_Pooling"))
    json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
              open(os.path.join(folder, "modules.json"), "w"))
    json.dump({"word_embedding_dimension": hf.config.hidden_size, "pooling_mode_lasttoken": True},
              open(os.path.join(folder, "1_Pooling", "config.json"), "w"))
    return folder, hf.model


def test_last_token_pooling_matches_transformers(decoder_folder):
    folder, base = decoder_folder
    model = EmbeddingModel(folder)
    assert json.load(open(os.path.join(folder, "config.json")))["architectures"] == ["Qwen3Model"]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 9)]
    ours = model.embed(inputs)  # one batch of mixed lengths
    with torch.no_grad():
        ref = torch.stack([torch.nn.functional.normalize(base(torch.tensor([x])).last_hidden_state[0, -1], dim=-1)
                           for x in inputs])
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() >= 0.9999, cos
    assert model.dimensions == base.config.hidden_size
    # a second batch reuses the cache and gives the same vectors
    assert torch.allclose(model.embed(inputs[2:4]), ours[2:4], atol=1e-5)
