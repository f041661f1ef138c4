"""The server reaches the engine only through its client (keel.engine.async_engine.AsyncEngine): no
module of keel/server reads the engine or its parts (scheduler, block pool, runner, grammar backend,
adapter manager) directly
(`ServerState.engine` exists for startup and tests), so what the engine thread mutates is never read across threads."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "keel" / "server"
# `lora` and `structured` are also request fields (body.lora, params.structured): reaching them through
# the engine is caught by `engine` itself.
ENGINE_PARTS = {"engine", "scheduler", "pool", "runner"}


def reaches_in(source: str) -> list[tuple[int, str]]:
    """(line, attribute) of every `x.<engine part>` read in the source."""
    return [(node.lineno, node.attr) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr in ENGINE_PARTS]


def test_server_modules_use_only_the_engine_client():
    found = {p.name: hits for p in sorted(SERVER.glob("*.py")) if (hits := reaches_in(p.read_text()))}
    assert not found, f"keel/server reaches into the engine (use the AsyncEngine client): {found}"


def test_the_check_sees_a_reach_in():
    assert sorted(reaches_in("state.engine.scheduler.running")) == [(1, "engine"), (1, "scheduler")]
    assert reaches_in("state.client.stats().num_running") == []
