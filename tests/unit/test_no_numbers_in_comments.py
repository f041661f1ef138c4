"""Measurements live in bench/results/, not in keel's comments and docstrings, where they rot: no
comment or docstring quotes a time, a throughput or a speed-up, nor the machine it was measured on."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "keel"
MEASUREMENT = re.compile(r"\b\d+(\.\d+)?\s?(ms|us|µs|tok/s|tokens/s|GB/s|GFLOP/s)\b|\b\d+(\.\d+)?x (faster|slower)\b"
                         r"|\bEPYC\b|\bXeon\b|\b\d+-core\b")


def prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring."""
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
           if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    return out


def test_no_measurements_in_comments_or_docstrings():
    found = [f"{p.relative_to(ROOT.parent)}:{line}: {m.group(0)!r}" for p in sorted(ROOT.rglob("*.py"))
             for line, text in prose(p.read_text()) for m in [MEASUREMENT.search(text)] if m]
    assert not found, "quote bench/results/ instead:\n" + "\n".join(found)


def test_the_check_finds_one():
    assert [t for _, t in prose('"""Fast: 3.2 ms a step."""\nx = 1  # 2x faster on EPYC\n')] == \
        ["# 2x faster on EPYC", "Fast: 3.2 ms a step."]
    assert MEASUREMENT.search("# 2x faster on EPYC") and MEASUREMENT.search("3.2 ms")
