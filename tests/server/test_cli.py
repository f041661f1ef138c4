"""`keel serve`: arguments reach the engine and the app (uvicorn itself is stubbed out)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import keel.serve_cli
from keel.cli import main
from tests.server.conftest import MODEL


def serve(monkeypatch, *argv) -> dict:
    ran = {}

    def run(config, sock):
        host, port = sock.getsockname()[:2]
        sock.close()
        ran.update(app=config.app, host=host, port=port, http=config.http,
                   limit_concurrency=config.limit_concurrency, log_level=config.log_level)
    monkeypatch.setattr(keel.serve_cli, "_run_uvicorn", run)
    if "--port" not in argv:
        argv = (*argv, "--port", "0")  # whatever is free: 8000 may be taken on this machine
    if "--state-db" not in argv:
        argv = (*argv, "--state-db", ":memory:")  # not the user's own state file
    assert main(["serve", *argv]) == 0
    ran["state"] = ran["app"].state.keel
    ran["state"].client.shutdown()
    return ran


def test_serve_arguments(tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setenv("KEEL_API_KEY", "from-env")
    ran = serve(monkeypatch, tiny_ckpt, "--port", str(free_port()), "--max-num-seqs", "3", "--max-waiting", "5",
                "--max-model-len", "128", "--dtype", "float32", "--kv-cache-memory-gb", "0.001")
    state = ran["state"]
    assert ran["host"] == "127.0.0.1" and ran["log_level"] == "info"  # serve logs requests by default
    summary = capsys.readouterr().err
    for part in (f"serving {MODEL}", "KV cache", "context 128", "float32", f"http://127.0.0.1:{ran['port']}/v1"):
        assert part in summary, summary
    assert state.served_model_name == MODEL  # the folder's name
    assert state.api_key == "from-env"
    assert state.client.max_waiting == 5 and state.engine.scheduler_config.max_num_seqs == 3
    assert state.engine.max_model_len == 128 and state.engine.cache_config.kv_cache_memory_gb == 0.001

    monkeypatch.delenv("KEEL_API_KEY")
    state = serve(monkeypatch, "--model", tiny_ckpt, "--served-model-name", "my-model", "--host", "0.0.0.0",
                  "--port", "0")["state"]
    assert state.served_model_name == "my-model" and state.api_key is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_port_in_use_fails_before_the_model_loads(tmp_path):
    """Through a real process: within seconds, with the reason, and without reading any weight (the
    model named here does not even exist, which would otherwise be the error)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "keel.cli", "serve", str(tmp_path / "no-model"), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
        took = time.monotonic() - start
    assert p.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in p.stderr and "--port" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and took < 5


def test_serve_bad_model_is_a_clean_error(capsys):
    assert main(["serve", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_embedding_model_flags(tiny_ckpt, monkeypatch, tmp_path):
    from keel.embed import builtin_embedding_path
    state = serve(monkeypatch, tiny_ckpt, "--dtype", "float32")["state"]
    if builtin_embedding_path() is not None:  # installed by scripts/setup.sh
        assert state.embeddings.model.name == "all-MiniLM-L6-v2"
    else:
        assert state.embeddings is None
    assert serve(monkeypatch, tiny_ckpt, "--no-embedding-model")["state"].embeddings is None
    assert main(["serve", tiny_ckpt, "--embedding-model", str(tmp_path / "nope")]) == 2


def test_serve_limit_and_security_flags(tiny_ckpt, monkeypatch, tmp_path):
    key = tmp_path / "key"
    key.write_text("from-file\n")
    allowed = tmp_path / "adapters"
    allowed.mkdir()
    ran = serve(monkeypatch, tiny_ckpt, "--api-key-file", str(key), "--max-request-bytes", "1000",
                "--body-timeout", "3", "--header-timeout", "2", "--max-connections", "7",
                "--max-embedding-inputs", "5", "--enable-lora", "--allowed-lora-path", str(allowed),
                "--show-lora-paths", "--enable-docs")
    state, limits = ran["state"], ran["state"].limits
    assert state.api_key == "from-file"
    assert (limits.max_request_bytes, limits.body_timeout_s, limits.header_timeout_s) == (1000, 3, 2)
    assert limits.max_embedding_inputs == 5 and ran["limit_concurrency"] == 7
    assert ran["http"].__name__.startswith("HeaderTimeout")
    assert state.lora_policy.roots == [str(allowed.resolve())] and state.lora_policy.show_paths
    assert ran["app"].openapi_url == "/openapi.json"

    state = serve(monkeypatch, tiny_ckpt, "--enable-lora", "--allow-any-lora-path")["state"]
    assert state.lora_policy.roots is None and not state.lora_policy.show_paths
    assert serve(monkeypatch, tiny_ckpt)["app"].openapi_url is None  # docs off by default


def test_serve_refuses_bad_security_settings(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "empty").write_text("  \n")
    assert main(["serve", tiny_ckpt, "--api-key-file", str(tmp_path / "empty")]) == 2
    assert main(["serve", tiny_ckpt, "--api-key-file", str(tmp_path / "missing")]) == 2
    assert main(["serve", tiny_ckpt, "--max-request-bytes", "0"]) == 2
    assert main(["serve", tiny_ckpt, "--lora", f"{MODEL}={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and "cannot read it" in err and "max_request_bytes" in err and "served model" in err


def _start(tiny_ckpt, *extra):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "keel.cli", "serve", tiny_ckpt, "--port", str(port), "--dtype",
                          "float32", "--no-embedding-model", "--state-db", ":memory:", *extra],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p, port
        except httpx.HTTPError:
            time.sleep(0.2)
    p.kill()
    raise AssertionError(p.communicate()[1])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_with_a_request_streaming_exits_cleanly(tiny_ckpt, sig):
    """The first Ctrl-C (or SIGTERM) stops new connections and lets the stream in flight finish (within
    --shutdown-timeout), then the process exits 0 with no traceback and no abort from a thread left
    running."""
    p, port = _start(tiny_ckpt, "--shutdown-timeout", "60")  # ample: a loaded CI machine is slow
    try:
        _stream_then_signal(p, port, sig)
    finally:
        p.kill()


def _stream_then_signal(p, port: int, sig) -> None:
    body = {"model": MODEL, "prompt": "t5 t6", "max_tokens": 100, "ignore_eos": True, "stream": True, "n": 4}
    events, sent = [], None
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            if len(events) == 3 and sent is None:  # once: a second Ctrl-C means "stop now"
                sent = time.monotonic()
                p.send_signal(sig)
    assert sent is not None and events[-1] == "[DONE]"  # finished, not cut off
    assert sum('"finish_reason":"length"' in e for e in events) == 4
    rc = p.wait(timeout=30)
    err = p.stderr.read()
    assert rc == 0, err
    assert "Traceback" not in err and "terminate called" not in err and "Aborted" not in err, err
    assert time.monotonic() - sent < 60


@pytest.mark.slow
def test_idle_server_stops_on_sigterm(tiny_ckpt):
    p, _ = _start(tiny_ckpt)
    try:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert "Traceback" not in p.stderr.read()
    finally:
        p.kill()


@pytest.mark.slow
def test_a_second_ctrl_c_ends_requests_at_once_and_cleanly(tiny_ckpt):
    """The second Ctrl-C ends the stream now (finish_reason length, the answer so far), well inside the
    60 s the first one would have allowed, and the exit is still clean."""
    p, port = _start(tiny_ckpt, "--shutdown-timeout", "60")
    try:
        body = {"model": MODEL, "prompt": "t5 t6", "max_tokens": 250, "ignore_eos": True, "stream": True, "n": 16}
        events, sent = [], None
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 4 and sent is None:
                    sent = time.monotonic()
                    p.send_signal(signal.SIGINT)
                    time.sleep(0.2)
                    p.send_signal(signal.SIGINT)
        assert events[-1] == "[DONE]" and sum('"finish_reason":"length"' in e for e in events) == 16
        assert len(events) < 16 * 100  # ended early: all 250 tokens of 16 choices would be ~4000 events
        rc = p.wait(timeout=30)
        err = p.stderr.read()
        assert rc == 0 and "Traceback" not in err and "terminate called" not in err, err
        assert time.monotonic() - sent < 20
    finally:
        p.kill()


def test_serve_kernel_flags_and_summary(tiny_ckpt, monkeypatch, capsys):
    """--kernels torch, --no-batch-invariant and --kv-cache-memory reach the engine, and the start summary
    lists which code computes each layer and how the KV cache was sized."""
    ran = serve(monkeypatch, tiny_ckpt, "--kernels", "torch", "--no-batch-invariant", "--kv-cache-memory", "0.002")
    engine = ran["state"].engine
    assert engine.backend.cpu is None and not engine.backend.batch_invariant
    assert engine.cache_config.kv_cache_memory_gb == 0.002
    summary = capsys.readouterr().err
    for part in ("kernels", "attention: torch sdpa", "PyTorch's operators, not batch-invariant",
                 "--kv-cache-memory 0.002 GiB"):
        assert part in summary, summary


def test_serve_refuses_an_isa_this_cpu_lacks(tiny_ckpt, monkeypatch, capsys):
    from keel.kernels import cpu
    monkeypatch.setattr(cpu, "runnable_isas", lambda flags=None: ["avx2"])
    assert main(["serve", tiny_ckpt, "--cpu-isa", "avx512", "--port", "0", "--state-db", ":memory:"]) != 0
    assert "cpu_isa=avx512 needs CPU features" in capsys.readouterr().err
