"""Real client libraries against a live keel serving the built-in model (their test extras:
openai-agents, langchain-openai)."""

from __future__ import annotations

import pytest

from keel.engine.llm_engine import LLMEngine
from keel.models.loader import DEFAULT_MODEL_NAME
from keel.server import create_app
from tests.server.conftest import LiveServer


@pytest.fixture(scope="session")
def keel_url():
    with LiveServer(create_app(LLMEngine(), served_model_name=DEFAULT_MODEL_NAME)) as s:
        yield s.url + "/v1"
