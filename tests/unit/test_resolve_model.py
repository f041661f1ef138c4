"""Where a model name leads: built-in default, local paths, and the hub (never reached in tests)."""

import os

import pytest

from keel.errors import ModelLoadError
from keel.models import loader


def test_default_is_the_builtin_gguf():
    path = loader.resolve_model(None)
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


def test_local_paths_are_used_as_they_are(tmp_path):
    assert loader.resolve_model(str(tmp_path)) == str(tmp_path)


def test_missing_local_path_is_an_error_not_a_download(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("tried the hub"))
    for name in (str(tmp_path / "nope"), "./model", "weights.gguf", "a/b/c"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            loader.resolve_model(name)


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    calls = []

    def fake(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert loader.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == str(tmp_path)
    assert calls[0][0] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "*.safetensors" in calls[0][1] and not any(p.endswith(".bin") for p in calls[0][1])


def test_hub_failure_is_a_load_error(monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(ModelLoadError, match="network unreachable"):
        loader.resolve_model("org/model")


def test_a_name_whose_first_part_exists_here_is_a_path(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("tried the hub"))
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("models/typo", "org\\name"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            loader.resolve_model(name)
    assert not loader.looks_local("Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.parametrize("file, name", [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("/m/Llama-3-8B-Instruct-Q4_K_M.gguf", "Llama-3-8B-Instruct"),
    ("qwen2.5-0.5b-instruct-fp16.gguf", "qwen2.5-0.5b-instruct"),
    ("tiny-IQ3_XS.gguf", "tiny"), ("model.gguf", "model"), ("Q4.gguf", "Q4"),
])
def test_a_gguf_is_served_under_its_name_without_the_quantization_tag(file, name):
    assert loader.gguf_served_name(file) == name


def test_the_builtin_gguf_by_path_keeps_the_readme_name():
    assert loader.open_checkpoint(loader.resolve_model(None)).name == "SmolLM2-135M-Instruct"
