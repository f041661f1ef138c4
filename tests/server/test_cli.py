"""`keel serve`: arguments reach the engine and the app (uvicorn itself is stubbed out)."""

from __future__ import annotations

import uvicorn

from keel.cli import main
from tests.server.conftest import MODEL


def serve(monkeypatch, *argv) -> dict:
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    assert main(["serve", *argv]) == 0
    ran["state"] = ran["app"].state.keel
    ran["state"].aeng.shutdown()
    return ran


def test_serve_arguments(tiny_ckpt, monkeypatch):
    monkeypatch.setenv("KEEL_API_KEY", "from-env")
    ran = serve(monkeypatch, tiny_ckpt, "--port", "8123", "--max-num-seqs", "3", "--max-waiting", "5",
                "--max-model-len", "128", "--dtype", "float32")
    state = ran["state"]
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8123)
    assert state.served_model_name == MODEL  # the folder's name
    assert state.api_key == "from-env"
    assert state.aeng.max_waiting == 5 and state.engine.scheduler_config.max_num_seqs == 3
    assert state.engine.max_model_len == 128

    monkeypatch.delenv("KEEL_API_KEY")
    state = serve(monkeypatch, "--model", tiny_ckpt, "--served-model-name", "my-model", "--host", "0.0.0.0")["state"]
    assert state.served_model_name == "my-model" and state.api_key is None


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
