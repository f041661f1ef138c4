"""keel.lock and the fingerprint derived from it: every ingredient that shapes outputs moves the
fingerprint and is caught by the lock, naming the file; nothing else does."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest

import keel
from keel.cli import main
from keel.quant.config import QuantConfig
from keel.registry.lock import build, differences, fingerprint
from keel.server.fingerprint import system_fingerprint
from tests.models.conftest import make_checkpoint


@pytest.fixture(scope="module")
def folder_and_adapter(tmp_path_factory):
    from tests.lora.conftest import make_peft_adapter
    root = tmp_path_factory.mktemp("lock")
    hf = make_checkpoint(str(root / "model"), "llama-gqa")
    make_peft_adapter(hf, str(root / "adapter"), seed=1, r=4, target_modules=["q_proj", "v_proj"])
    return str(root / "model"), str(root / "adapter")


def _engine(folder, **kw):
    from keel.engine.llm_engine import LLMEngine
    return LLMEngine(folder, dtype="float32", **kw)


def _fake(engine, folder, **changes):
    files = [os.path.join(folder, os.path.basename(f)) for f in engine.checkpoint_files]
    base = dict(checkpoint_files=files, model_path=folder, dtype=engine.dtype, device=engine.device,
                quantization=engine.quantization, backend=engine.backend, model_name="m")
    return SimpleNamespace(**{**base, **changes})


def _flip(path: str, at: float = 0.5) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(int(size * at))
        b = f.read(1)
        f.seek(int(size * at))
        f.write(bytes([b[0] ^ 1]))


def test_every_ingredient_moves_the_fingerprint_and_nothing_else(folder_and_adapter, tmp_path, monkeypatch):
    folder, _ = folder_and_adapter
    engine = _engine(folder)
    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy)
    fp = system_fingerprint(_fake(engine, copy))
    assert fp == system_fingerprint(engine)  # a copy elsewhere: the same
    (tmp_path / "copy" / "README.md").write_text("notes")  # not an ingredient
    assert system_fingerprint(_fake(engine, copy)) == fp
    assert system_fingerprint(_fake(engine, copy, dtype="bfloat16")) != fp
    assert system_fingerprint(_fake(engine, copy, quantization=QuantConfig("int8"))) != fp
    assert system_fingerprint(_fake(engine, copy, weight_dtype="bfloat16")) != fp
    monkeypatch.setattr(keel, "__version__", keel.__version__ + ".post1")
    assert system_fingerprint(_fake(engine, copy)) != fp
    monkeypatch.undo()
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (tmp_path / "copy" / "tokenizer_config.json").write_text(json.dumps(config))
    fp_template = system_fingerprint(_fake(engine, copy))
    assert fp_template != fp
    _flip(os.path.join(copy, "model.safetensors"), 0.61)  # one bit in the middle of the weights
    assert system_fingerprint(_fake(engine, copy)) not in (fp, fp_template)


def test_the_lock_names_what_changed(folder_and_adapter, tmp_path):
    folder, adapter = folder_and_adapter
    model, ad = str(tmp_path / "model"), str(tmp_path / "adapter")
    shutil.copytree(folder, model)
    shutil.copytree(adapter, ad)
    engine = _engine(model)
    locked = build(engine, {"a": ad})
    assert differences(locked, build(engine, {"a": ad})) == []
    _flip(os.path.join(ad, "adapter_model.safetensors"))
    _flip(os.path.join(model, "model.safetensors"), 0.3)
    diffs = differences(locked, build(engine, {"a": ad}))
    assert any(d.startswith("model file model.safetensors: sha256") for d in diffs), diffs
    assert any(d.startswith("adapter a file adapter_model.safetensors") for d in diffs), diffs
    assert differences(locked, build(engine, {}))[-1] == "adapter a: locked, but not served"
    from keel.registry.lock import adapter_fingerprint
    before = adapter_fingerprint("fp_base", adapter)  # the untouched original
    assert adapter_fingerprint("fp_base", ad) != before  # one flipped bit in the adapter's weights
    assert adapter_fingerprint("fp_base", adapter) == before and adapter_fingerprint("fp_other", adapter) != before
    assert fingerprint(locked) != fingerprint(build(engine))


def test_keel_lock_then_serve_refuses_a_changed_file(folder_and_adapter, tmp_path, capsys):
    folder, adapter = folder_and_adapter
    model = str(tmp_path / "model")
    shutil.copytree(folder, model)
    lock = str(tmp_path / "keel.lock")
    assert main(["lock", model, "--dtype", "float32", "--lora", f"a={adapter}", "-o", lock]) == 0
    record = json.load(open(lock))
    assert set(record["model"]["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert record["adapters"]["a"]["files"]["adapter_config.json"] and record["settings"]["dtype"] == "float32"
    _flip(os.path.join(model, "model.safetensors"), 0.7)
    argv = ["serve", model, "--dtype", "float32", "--lora", f"a={adapter}", "--lock", lock, "--port", "0",
            "--no-embedding-model", "--no-fine-tuning", "--state-db", ":memory:"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "differs from" in err and "model file model.safetensors" in err and "--accept-lock-changes" in err
    from keel.registry.cli import verify
    verify(lock, _engine(model), {"a": adapter}, accept=True)  # warns, does not raise
    with pytest.raises(keel.errors.KeelError):
        verify(lock, _engine(model), {"a": adapter}, accept=False)
