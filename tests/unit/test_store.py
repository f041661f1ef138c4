"""keel's model store: imports, a fake hub, serving by name, de-duplication, resuming, corruption, removal."""

from __future__ import annotations

import os
import shutil

import pytest

from keel.cli import main
from keel.registry.store import ModelStore
from tests.models.conftest import make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("store_src") / "tiny-model")
    make_checkpoint(folder, "llama-gqa")
    with open(os.path.join(folder, "LICENSE"), "w") as f:
        f.write("Apache-2.0\n")
    return folder


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _blobs(data) -> set[str]:
    return set(os.listdir(data / "models" / "blobs"))


def test_import_list_show_serve_by_name_and_remove(tiny, data, capsys):
    assert main(["pull", tiny]) == 0
    assert main(["pull", tiny, "--name", "twin"]) == 0  # the same bytes again: no new blob
    store = ModelStore()
    entry = store.find("tiny-model")
    assert entry is not None and set(entry.files) >= {"model.safetensors", "config.json", "LICENSE"}
    assert len(_blobs(data)) == len(entry.files)
    capsys.readouterr()
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in listing and "tiny-model" in listing and "twin" in listing
    assert main(["show", "tiny-model"]) == 0
    shown = capsys.readouterr().out
    assert f"{entry.files['model.safetensors']}  model.safetensors" in shown and "LICENSE" in shown

    from keel import LLM, SamplingParams
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    by_name = LLM("tiny-model", dtype="float32").generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    by_path = LLM(tiny, dtype="float32").generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    assert by_name == by_path

    assert main(["rm", "twin"]) == 0
    assert len(_blobs(data)) == len(entry.files)  # still used by tiny-model
    assert main(["rm", "tiny-model"]) == 0
    assert _blobs(data) == set() and ModelStore().find("tiny-model") is None
    assert main(["rm", "tiny-model"]) == 2


def test_pull_can_write_the_lock_of_what_it_stored(tiny, data, tmp_path):
    import json
    lock = str(tmp_path / "keel.lock")
    assert main(["pull", tiny, "--lock", lock]) == 0
    entry = ModelStore().find("tiny-model")
    record = json.load(open(lock))
    assert record["model"]["path"] == entry.path
    assert all(entry.files[name] == digest for name, digest in record["model"]["files"].items())


def test_a_corrupted_file_is_detected(tiny, data, capsys):
    entry = ModelStore().add(tiny, "tiny-model", None, "local")
    path = os.path.join(entry.path, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    assert main(["show", "tiny-model", "--verify"]) == 1
    assert "CORRUPTED model.safetensors" in capsys.readouterr().err


def test_an_interrupted_import_copies_only_what_is_missing(tiny, data, monkeypatch):
    store = ModelStore()
    entry = store.add(tiny, "tiny-model", None, "local")
    victim = entry.files["model.safetensors"]
    os.remove(store._blob(victim))  # as if the import had stopped before this file
    with open(store._blob(victim) + ".123.part", "wb") as f:
        f.write(b"half")
    copies = []
    real = shutil.copyfile
    monkeypatch.setattr(shutil, "copyfile", lambda a, b: copies.append(a) or real(a, b))
    again = store.add(tiny, "tiny-model", None, "local")
    assert [os.path.basename(c) for c in copies] == ["model.safetensors"] and again.revision == entry.revision
    assert store.verify(again) == []


def _fake_hub(root, repo: str, commit: str, folder: str) -> None:
    """The Hugging Face cache layout huggingface_hub reads in offline mode."""
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    shutil.copytree(folder, os.path.join(base, "snapshots", commit))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)


def test_pull_from_a_fake_hub_records_the_commit_and_fails_fast_without_one(tiny, data, tmp_path, monkeypatch, capsys):
    hub = str(tmp_path / "hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub(hub, "acme/tiny", commit, tiny)
    monkeypatch.setenv("HF_HUB_CACHE", hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", hub)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert main(["pull", "acme/tiny"]) == 0
    entry = ModelStore().find("acme/tiny")
    assert entry.revision == commit and entry.source == "hf:acme/tiny"
    assert ModelStore().find(f"acme/tiny@{commit[:8]}").revision == commit
    capsys.readouterr()
    assert main(["pull", "acme/missing"]) == 2
    err = capsys.readouterr().err
    assert "cannot pull acme/missing" in err and "keel pull ./path/to/model" in err
