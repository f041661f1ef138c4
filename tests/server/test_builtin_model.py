"""The real thing: the built-in SmolLM2-135M-Instruct served and asked through the openai client."""

from __future__ import annotations

import pytest

from keel.engine.llm_engine import LLMEngine
from keel.models.loader import DEFAULT_MODEL_NAME
from keel.server import create_app
from tests.server.conftest import LiveServer

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") skips this module


def test_builtin_model_knows_the_capital_of_france():
    app = create_app(LLMEngine(), served_model_name=DEFAULT_MODEL_NAME)
    with LiveServer(app) as s:
        client = s.client()
        assert client.models.list().data[0].id == DEFAULT_MODEL_NAME
        r = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=32)
        assert "Paris" in r.choices[0].message.content
        assert r.usage.completion_tokens <= 32 and r.choices[0].finish_reason in ("stop", "length")
