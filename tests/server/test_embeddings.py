"""POST /v1/embeddings through the official client: both encodings, every input form, exact usage,
OpenAI's response schema, and a 400/404 for every kind of bad request, the server serving on after."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import torch

from keel.embed import EmbeddingModel
from keel.server import create_app
from tests.embed.conftest import BUILTIN, hf_reference, make_tiny_bert, needs_builtin
from tests.server.conftest import MODEL, LiveServer, tiny_engine

pytestmark = needs_builtin
EMB = "all-MiniLM-L6-v2"
TEXTS = ["The capital of France is Paris.", "Ünïcödé — 日本語のテキスト 🚀", "A third, rather longer sentence " * 5]


@pytest.fixture(scope="module")
def live(tiny_ckpt):
    app = create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, embedding_model=EmbeddingModel())
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    return hf_reference(BUILTIN, TEXTS)


def cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(torch.tensor(a, dtype=torch.float32), b, dim=-1).min().item()


def test_default_encoding_is_base64_and_matches_transformers(live, reference):
    client = live.client()
    r = client.embeddings.create(model=EMB, input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == EMB
    assert cos([d.embedding for d in r.data], reference) >= 0.9999
    tokens = sum(len(live.state.embeddings.model.encode(t)) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    floats = client.embeddings.create(model=EMB, input=TEXTS[1], encoding_format="float")
    assert len(floats.data) == 1 and len(floats.data[0].embedding) == 384
    assert cos([floats.data[0].embedding], reference[1:2]) >= 0.9999


def test_raw_base64_and_schema(live, reference, schemas):
    body = live.http().post("/v1/embeddings", json={"model": EMB, "input": TEXTS[0], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,) and cos([vec.tolist()], reference[:1]) >= 0.9999
    plain = live.http().post("/v1/embeddings", json={"model": EMB, "input": TEXTS}).json()
    schemas.validate("CreateEmbeddingResponse", plain)
    assert plain["object"] == "list" and all(d["object"] == "embedding" for d in plain["data"])


def test_token_id_inputs(live, reference):
    model = live.state.embeddings.model
    ids = [model.encode(t) for t in TEXTS]
    client = live.client()
    one = client.embeddings.create(model=EMB, input=ids[0], encoding_format="float")
    many = client.embeddings.create(model=EMB, input=ids, encoding_format="float")
    assert cos([one.data[0].embedding], reference[:1]) >= 0.9999
    assert cos([d.embedding for d in many.data], reference) >= 0.9999
    assert many.usage.prompt_tokens == sum(map(len, ids))


def test_models_lists_the_embedding_model(live):
    ids = [m.id for m in live.client().models.list().data]
    assert ids == [MODEL, EMB]
    assert live.client().models.retrieve(EMB).id == EMB


BAD = [
    ({"input": []}, 400, "empty list"),
    ({"input": ""}, 400, "empty string"),
    ({"input": ["ok", ""]}, 400, "input[1]"),
    ({"input": [[]]}, 400, "empty token list"),
    ({"input": [5, 99999999]}, 400, "outside the vocabulary"),
    ({"input": "word " * 400}, 400, "over this model's maximum of 256 tokens"),
    ({"input": "hi", "dimensions": 128}, 400, "not trained to be shortened"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "hi", "bogus": 1}, 400, "bogus"),
    ({"input": "hi", "model": MODEL}, 400, "is a chat model"),
    ({"input": "hi", "model": "nobody"}, 404, "does not exist"),
]


@pytest.mark.parametrize("extra,status,message", BAD)
def test_bad_requests(live, extra, status, message):
    r = live.http().post("/v1/embeddings", json={"model": EMB, **extra})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] + str(err["param"]), err
    ok = live.client().embeddings.create(model=EMB, input="still serving", encoding_format="float")
    assert len(ok.data[0].embedding) == 384


def test_truncation_extension_and_full_dimensions(live):
    model = live.state.embeddings.model
    long = "word " * 400
    r = live.http().post("/v1/embeddings", json={"model": EMB, "input": long, "truncation": True,
                                                 "encoding_format": "float", "dimensions": 384}).json()
    first = model.encode(long)[:256]
    assert r["usage"]["prompt_tokens"] == 256
    assert cos([r["data"][0]["embedding"]], model.embed([first])) >= 0.99999


def test_embedding_model_refuses_chat(live):
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        live.client().chat.completions.create(model=EMB, messages=[{"role": "user", "content": "t5"}])
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        live.client().completions.create(model=EMB, prompt="t5")


def test_shortening_for_a_matryoshka_model(tmp_path, tiny_ckpt):
    folder = make_tiny_bert(str(tmp_path / "mrl"), {"mean_tokens": True}, True)
    with open(f"{folder}/config_sentence_transformers.json", "w") as f:
        json.dump({"matryoshka_dimensions": [48, 16]}, f)
    model = EmbeddingModel(folder, name="tiny-mrl")
    app = create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, embedding_model=model)
    with LiveServer(app) as s:
        full = s.client().embeddings.create(model="tiny-mrl", input="hello there", encoding_format="float")
        short = s.client().embeddings.create(model="tiny-mrl", input="hello there", dimensions=16)
        v = torch.tensor(full.data[0].embedding)
        assert len(short.data[0].embedding) == 16
        assert torch.allclose(torch.tensor(short.data[0].embedding), torch.nn.functional.normalize(v[:16], dim=0), atol=1e-5)
        r = s.http().post("/v1/embeddings", json={"model": "tiny-mrl", "input": "x", "dimensions": 64})
        assert r.status_code == 400 and "over the model's 48" in r.json()["error"]["message"]


def test_no_embedding_model_means_404(server):
    r = server.http().post("/v1/embeddings", json={"model": EMB, "input": "hi"})
    assert r.status_code == 404
    r = server.http().post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert r.status_code == 400 and "serves no embedding model" in r.json()["error"]["message"]
