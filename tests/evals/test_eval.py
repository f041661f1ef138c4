"""`keel eval` on a tiny model: against itself, against itself quantized, and against a server over HTTP."""

from __future__ import annotations

import json
import os

import pytest

from keel.cli import main
from tests.server.conftest import LiveServer, tiny_engine

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
# (the tiny model's word-level tokenizer cannot spell JSON: schema and tool cases are checked on answers
# made up below, and through the built-in model in the slow test)


def _suite(path) -> str:
    cases = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"t{10 + i} t{20 + i} t{30 + i}"}],
              "max_tokens": 8} for i in range(6)]
    cases[0]["expected"] = "t5 t6"
    cases[2].update(temperature=1.0, samples=3, seed=4)
    with open(path, "w") as f:
        f.write("".join(json.dumps(c) + "\n" for c in cases))
    return str(path)


def _run(capsys, *argv) -> tuple[int, dict, str]:
    rc = main(["eval", *argv])
    out = argv[argv.index("--out") + 1]
    summary = json.load(open(os.path.join(out, "summary.json"))) if os.path.exists(os.path.join(out, "summary.json")) else {}
    return rc, summary, capsys.readouterr().err


def test_a_model_against_itself_agrees_exactly_and_a_rerun_resumes(tiny_ckpt, tmp_path, capsys):
    suite, out = _suite(tmp_path / "suite.jsonl"), str(tmp_path / "same")
    rc, s, err = _run(capsys, suite, "--a", tiny_ckpt, "--b", tiny_ckpt, "--out", out, "--min-exact-match", "1.0",
                      "--min-similarity", "0.999")
    assert rc == 0, err
    assert s["exact_match"] == 1.0 and s["similarity"] > 0.999 and s["cases"] == 6 and s["samples"] == 8
    assert s["expected_a"] == s["expected_b"] == 0.0 and s["errors_a"] == s["errors_b"] == 0
    page = open(os.path.join(out, "report.html")).read()
    assert page.startswith("<!doctype html>") and "<svg" in page and "PASS: exact match 1.000" in page
    assert "| exact match (A = B) | 1.000 |" in open(os.path.join(out, "report.md")).read()
    lines = open(os.path.join(out, "answers-a.jsonl")).read().splitlines()
    assert len(lines) == 1 + 8
    # a second run over the same folder asks nothing again
    rc, s2, _ = _run(capsys, suite, "--a", tiny_ckpt, "--b", tiny_ckpt, "--out", out)
    assert rc == 0 and s2 == s and len(open(os.path.join(out, "answers-a.jsonl")).read().splitlines()) == 9


def test_quantization_drift_is_measured_and_fails_a_strict_gate(tiny_ckpt, tmp_path, capsys):
    suite = _suite(tmp_path / "suite.jsonl")
    rc, s, err = _run(capsys, suite, "--a", tiny_ckpt, "--b", tiny_ckpt, "--b-quantize", "int4",
                      "--out", str(tmp_path / "q"), "--min-exact-match", "0.99")
    assert rc == 1 and "FAIL: exact match" in err
    assert s["exact_match"] < 1.0 and s["similarity"] < 1.0


@pytest.mark.slow
def test_a_server_over_http_is_a_target_like_a_local_model(tiny_ckpt, tmp_path, capsys):
    from keel.server import create_app
    suite = _suite(tmp_path / "suite.jsonl")
    with LiveServer(create_app(tiny_engine(tiny_ckpt), served_model_name="tiny", default_max_tokens=None)) as server:
        rc, s, err = _run(capsys, suite, "--a", tiny_ckpt, "--b", server.url + "/v1", "--out", str(tmp_path / "h"),
                          "--min-exact-match", "1.0")
    assert rc == 0, err
    assert s["exact_match"] == 1.0


@pytest.mark.parametrize("body, words", [('{"messages": []}\n', "line 1"), ('{"messages": [{"role": "user", "content": "x"}], "oops": 1}\n', "unknown key"),
                                          ("not json\n", "not valid JSON")])
def test_a_bad_suite_is_a_clean_error(tmp_path, capsys, body, words):
    suite = tmp_path / "bad.jsonl"
    suite.write_text(body)
    assert main(["eval", str(suite), "--a", "x", "--b", "y", "--out", str(tmp_path / "o")]) == 2
    assert words in capsys.readouterr().err


def test_an_unreachable_url_is_a_clean_error(tmp_path, capsys, tiny_ckpt):
    from tests.server.test_cli import free_port
    suite = _suite(tmp_path / "suite.jsonl")
    rc = main(["eval", suite, "--a", f"http://127.0.0.1:{free_port()}/v1", "--b", tiny_ckpt, "--out", str(tmp_path / "u")])
    assert rc == 2 and "cannot list its models" in capsys.readouterr().err


def test_the_comparison_on_made_up_answers():
    import torch

    from keel.evals.metrics import compare, summary
    from keel.evals.suite import Case
    from keel.evals.targets import Answer
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    cases = [Case("json", [{"role": "user", "content": "x"}], schema=SCHEMA),
             Case("tool", [{"role": "user", "content": "x"}], tools=tools),
             Case("exp", [{"role": "user", "content": "x"}], expected="Paris")]

    def ans(text, calls=()):
        return Answer(text, [{"name": n, "arguments": a} for n, a in calls], "stop", 0.1, 5, 3)
    a = {("json", 0): ans('{"a": 1}'), ("tool", 0): ans("", [("f", '{"x": 1}')]), ("exp", 0): ans(" paris ")}
    b = {("json", 0): ans('{"a": "one"}'), ("tool", 0): ans("", [("f", '{ "x" : 1 }')]), ("exp", 0): ans("Lyon")}

    def embed(texts):  # one unit vector per distinct normalized text
        keys = sorted(set(t.strip().lower() for t in texts))
        return torch.eye(len(keys))[[keys.index(t.strip().lower()) for t in texts]]
    results = {r.case.id: r for r in compare(cases, a, b, embed)}
    assert results["json"].json_valid_a == 1.0 and results["json"].json_valid_b == 0.0
    assert results["tool"].tools_agree == 1.0 and results["tool"].exact == 1.0  # same call, other spacing
    assert results["exp"].expected_a == 1.0 and results["exp"].expected_b == 0.0 and results["exp"].exact == 0.0
    s = summary(list(results.values()))
    assert s["exact_match"] == pytest.approx(1 / 3) and s["min_similarity"] == 0.0


@pytest.mark.slow
def test_the_built_in_model_against_its_int8_copy(tmp_path, capsys):
    """The shipped suite (JSON schema and tool cases included) on the real model: dense float32 against
    the GGUF blocks agrees exactly; int8 drifts, and a strict gate fails."""
    suite = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "data", "eval_suite.jsonl")
    rc, s, err = _run(capsys, suite, "--a", "builtin", "--b", "builtin", "--b-quantize", "none",
                      "--out", str(tmp_path / "dense"), "--min-exact-match", "1.0")
    assert rc == 0, err
    assert s["json_valid_a"] == s["json_valid_b"] == 1.0 and s["tools_agree"] == 1.0
    rc, s, err = _run(capsys, suite, "--a", "builtin", "--b", "builtin", "--b-quantize", "int8",
                      "--out", str(tmp_path / "int8"), "--min-exact-match", "0.95")
    assert rc == 1 and s["exact_match"] < 0.95 and 0.5 < s["similarity"] < 1.0


@pytest.mark.slow
def test_a_lock_file_is_a_target_and_a_changed_file_refuses_it(tiny_ckpt, tmp_path, capsys):
    import shutil
    model = str(tmp_path / "model")
    shutil.copytree(tiny_ckpt, model)
    lock = str(tmp_path / "keel.lock")
    assert main(["lock", model, "--dtype", "float32", "-o", lock]) == 0
    suite = _suite(tmp_path / "suite.jsonl")
    rc, s, err = _run(capsys, suite, "--a", tiny_ckpt, "--b", lock, "--out", str(tmp_path / "l"), "--min-exact-match", "1.0")
    assert rc == 0 and s["exact_match"] == 1.0, err
    with open(os.path.join(model, "model.safetensors"), "r+b") as f:
        f.seek(5000)
        f.write(b"\x01\x02")
    rc = main(["eval", suite, "--a", tiny_ckpt, "--b", lock, "--out", str(tmp_path / "l2")])
    assert rc == 2 and "model file model.safetensors" in capsys.readouterr().err
