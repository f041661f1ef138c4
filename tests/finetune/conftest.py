"""Fine-tuning fixtures: a tiny random Llama with a chat template over its own tokens, and chat data."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from tests.models.conftest import make_checkpoint
from tests.server.conftest import CHAT_TEMPLATE


def with_template(folder: str) -> str:
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def ft_ckpt(tmp_path_factory):
    """(folder, transformers model) of a tiny Llama whose template writes t3 user t6 t4 assistant t6."""
    folder = str(tmp_path_factory.mktemp("ft") / "tiny-llama")
    model = make_checkpoint(folder, "llama-gqa")
    return with_template(folder), model


def fact_examples(n: int, seed: int = 0) -> list[dict]:
    """Chat examples of a made-up mapping: the user says "t{20+k}", the assistant answers "t{100+k} t{150+k}"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(8)
        out.append({"messages": [{"role": "system", "content": "t9"},
                                 {"role": "user", "content": f"t{20 + k}"},
                                 {"role": "assistant", "content": f"t{100 + k} t{150 + k}"}]})
    return out


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def wait_for(check, timeout: float, every: float = 0.1):
    """Poll check() until it returns a true value or the timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)
