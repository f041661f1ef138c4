"""response_format through the official openai client against a server running the built-in model."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest

from keel.models.loader import DEFAULT_MODEL_NAME as MODEL
from tests.structured.conftest import BAD_SCHEMAS, PERSON, PROMPT

# the built-in model behind every test here: the full suite runs them, the fast tier does not
pytestmark = pytest.mark.slow


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_with_n_choices(server):
    r = server.client().chat.completions.create(model=MODEL, messages=PROMPT, temperature=1.0, seed=7, n=4,
                                                max_tokens=128, response_format=json_schema_format(PERSON))
    assert len(r.choices) == 4 and len({c.message.content for c in r.choices}) > 1  # each choice its own matcher
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
        assert c.finish_reason == "stop"
    server.wait_idle()


def test_streamed_json_object(server):
    stream = server.client().chat.completions.create(
        model=MODEL, temperature=1.0, seed=5, max_tokens=128, stream=True, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Give the capital of France as {"city": ..., "country": ...}.'}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict), text
    assert chunks[-1].choices[0].finish_reason == "stop"
    server.wait_idle()


def test_parse_into_a_pydantic_model(server):
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=16)
        population_millions: int = pydantic.Field(ge=0, le=40)

    r = server.client().chat.completions.parse(
        model=MODEL, temperature=1.0, seed=1, max_tokens=64, response_format=City,
        messages=[{"role": "user", "content": "Describe Paris."}])
    city = r.choices[0].message.parsed  # the SDK validated the content against City
    assert isinstance(city, City) and 0 <= city.population_millions <= 40
    server.wait_idle()


def test_bad_schemas_are_400s_and_the_server_goes_on(server):
    client = server.client()
    for schema, word in BAD_SCHEMAS:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8,
                                           response_format=json_schema_format(schema))
        assert e.value.code == "invalid_json_schema" and e.value.param == "response_format"
        assert word in e.value.message
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for fmt, param in [({"type": "json_schema"}, "response_format.json_schema"),
                           ({"type": "json_object", "json_schema": {"name": "x"}}, "response_format.json_schema"),
                           ({"type": "xml"}, "response_format.type"),
                           ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
                            "response_format.json_schema.name")]:
            r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "response_format": fmt})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=1.0, seed=2, max_tokens=8,
                                       response_format=json_schema_format({"enum": ["yes", "no"]}))
    assert json.loads(r.choices[0].message.content) in ("yes", "no")
    server.wait_idle()
