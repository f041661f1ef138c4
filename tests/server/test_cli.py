"""`keel serve`: arguments reach the engine and the app (uvicorn itself is stubbed out)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import keel.cli
from keel.cli import main
from tests.server.conftest import MODEL


def serve(monkeypatch, *argv) -> dict:
    ran = {}

    def run(config, sock):
        host, port = sock.getsockname()[:2]
        sock.close()
        ran.update(app=config.app, host=host, port=port, http=config.http,
                   limit_concurrency=config.limit_concurrency, log_level=config.log_level)
    monkeypatch.setattr(keel.cli, "_run_uvicorn", run)
    if "--port" not in argv:
        argv = (*argv, "--port", "0")  # whatever is free: 8000 may be taken on this machine
    assert main(["serve", *argv]) == 0
    ran["state"] = ran["app"].state.keel
    ran["state"].aeng.shutdown()
    return ran


def test_serve_arguments(tiny_ckpt, monkeypatch):
    monkeypatch.setenv("KEEL_API_KEY", "from-env")
    ran = serve(monkeypatch, tiny_ckpt, "--port", str(free_port()), "--max-num-seqs", "3", "--max-waiting", "5",
                "--max-model-len", "128", "--dtype", "float32")
    state = ran["state"]
    assert ran["host"] == "127.0.0.1" and ran["log_level"] == "info"  # serve logs requests by default
    assert state.served_model_name == MODEL  # the folder's name
    assert state.api_key == "from-env"
    assert state.aeng.max_waiting == 5 and state.engine.scheduler_config.max_num_seqs == 3
    assert state.engine.max_model_len == 128

    monkeypatch.delenv("KEEL_API_KEY")
    state = serve(monkeypatch, "--model", tiny_ckpt, "--served-model-name", "my-model", "--host", "0.0.0.0",
                  "--port", "0")["state"]
    assert state.served_model_name == "my-model" and state.api_key is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    assert "Traceback" not in p.stderr and took < 15


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
