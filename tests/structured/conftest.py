"""Fixtures for structured outputs: the built-in SmolLM2-135M-Instruct (a real byte-level BPE
vocabulary, so grammars meet real tokens), loaded once and shared by the offline API and a server.

The server steps the same engine from its own thread; that is safe because tests run one at a time
and every server test waits until the server is idle before it returns.
"""

from __future__ import annotations

import pytest

from keel import LLM
from keel.models.loader import DEFAULT_MODEL_NAME
from keel.server import create_app
from tests.server.conftest import LiveServer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "zip": {"type": "integer", "minimum": 1000,
                                                                               "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Describe a person as JSON with name, age, favourite color, tags and address."}]

# Schemas that must be refused, and a word the refusal must name.
BAD_SCHEMAS = [
    ({"type": "foo"}, "foo"),  # not JSON Schema
    ({"type": "integer", "minimum": "ten"}, "minimum"),  # not JSON Schema
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),  # a pattern the library cannot enforce
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),  # a keyword the library cannot enforce
    ({"not": {"type": "string"}}, "not"),
    ({"type": "string", "format": "postal-code"}, "postal-code"),  # unknown format
    ({"$ref": "#/$defs/missing"}, "missing"),
]


@pytest.fixture(scope="session")
def llm() -> LLM:
    return LLM()


@pytest.fixture(scope="session")
def server(llm):
    with LiveServer(create_app(llm.engine, served_model_name=DEFAULT_MODEL_NAME)) as s:
        yield s
