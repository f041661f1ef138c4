"""keel.lock: what produced an answer, pinned. For the base model (weights, config, tokenizer and chat
template files), each adapter, and keel itself: the sha256 of every file, and the settings that shape
the output (dtype, device, quantization, weight dtype, the kernels chosen for each layer). Written by
`keel lock`; `keel serve --lock keel.lock` refuses to start when anything differs, naming it.

`system_fingerprint` is a digest of exactly this record (without paths), so two servers with the same
fingerprint run the same bytes the same way, and nothing else (a README beside the weights, the port,
the machine's name, the time) moves it.
"""

from __future__ import annotations

import hashlib
import json
import os

import keel
from keel.errors import KeelError
from keel.registry.digests import sha256_file

LOCK_VERSION = 1
# Files next to the weights that shape the output (tokenization, chat template, stop ids, config).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.json", "chat_template.jinja")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def model_files(engine) -> list[str]:
    files = list(engine.checkpoint_files)
    folder = engine.model_path if os.path.isdir(engine.model_path) else None
    if folder:
        files += [os.path.join(folder, n) for n in SIDE_FILES if os.path.isfile(os.path.join(folder, n))]
    return files


def _digests(paths: list[str], rehash: bool = False) -> dict[str, str]:
    return {os.path.basename(p): sha256_file(p, rehash) for p in sorted(paths, key=os.path.basename)}


def settings(engine) -> dict:
    quant = getattr(engine, "quantization", None)  # quantizing at load changes the weights the files hold
    backend = getattr(engine, "backend", None)  # which kernels compute: they round differently
    out = {"dtype": str(engine.dtype).removeprefix("torch."),
           "device": getattr(getattr(engine, "device", None), "type", "cpu"),
           "quantization": quant.describe() if quant is not None else "none",
           "kernels": backend.digest() if backend is not None else "default"}
    if getattr(engine, "weight_dtype", "auto") == "bfloat16":  # rounds weights; "auto" keeps them exact
        out["weight_dtype"] = "bfloat16"
    return out


def load_args(engine) -> dict:
    """How to load the model again the same way (what `keel eval` does with a lock file as a target)."""
    quant = getattr(engine, "quantization", None)
    return {"dtype": str(engine.dtype).removeprefix("torch."), "weight_dtype": getattr(engine, "weight_dtype", "auto"),
            "quantization": None if quant is None else {"method": quant.method, "group_size": quant.group_size,
                                                        "quantize_embeddings": quant.quantize_embeddings}}


def adapter_files(path: str) -> list[str]:
    return [os.path.join(path, n) for n in ADAPTER_FILES if os.path.isfile(os.path.join(path, n))]


def build(engine, adapters: dict[str, str] | None = None, rehash: bool = False) -> dict:
    """The lock record of a loaded engine and the adapters (name -> folder) it serves."""
    return {"lock_version": LOCK_VERSION, "keel": keel.__version__,
            "model": {"name": getattr(engine, "model_name", None), "path": engine.model_path,
                      "files": _digests(model_files(engine), rehash)},
            "settings": settings(engine),
            "load": load_args(engine),
            "adapters": {name: {"path": path, "files": _digests(adapter_files(path), rehash)}
                         for name, path in sorted((adapters or {}).items())}}


def fingerprint(record: dict) -> str:
    """fp_ + 10 hex digits of the record's content: its files' digests, its settings, keel's version."""
    body = {"keel": record["keel"], "files": record["model"]["files"], "settings": record["settings"]}
    h = hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16)
    return "fp_" + h.hexdigest()[:10]


def adapter_fingerprint(base: str, path: str, stored_as=None) -> str:
    """An adapter's: the base's fingerprint, its files' digests and the dtype it is served in."""
    body = {"base": base, "lora_dtype": str(stored_as), "files": _digests(adapter_files(path))}
    return "fp_" + hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()[:10]


def write(record: dict, path: str) -> None:
    with open(path + ".part", "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(path + ".part", path)


def read(path: str) -> dict:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise KeelError(f"cannot read the lock file {path}: {e}") from None
    if not isinstance(record, dict) or record.get("lock_version") != LOCK_VERSION:
        raise KeelError(f"{path} is not a keel.lock of version {LOCK_VERSION}")
    return record


def differences(locked: dict, current: dict) -> list[str]:
    """What differs between a lock and what is loaded now, one line each, files named."""
    out = []
    if locked.get("keel") != current["keel"]:
        out.append(f"keel version: locked {locked.get('keel')}, running {current['keel']}")

    def files(what: str, want: dict, have: dict) -> None:
        for name in sorted(set(want) | set(have)):
            if name not in have:
                out.append(f"{what} file {name}: locked, but missing")
            elif name not in want:
                out.append(f"{what} file {name}: present, but not in the lock")
            elif want[name] != have[name]:
                out.append(f"{what} file {name}: sha256 {have[name][:12]}..., locked {want[name][:12]}...")
    files("model", locked.get("model", {}).get("files", {}), current["model"]["files"])
    for key in sorted(set(locked.get("settings", {})) | set(current["settings"])):
        a, b = locked.get("settings", {}).get(key), current["settings"].get(key)
        if a != b:
            out.append(f"setting {key}: locked {a}, running {b}")
    want_adapters, have_adapters = locked.get("adapters", {}), current["adapters"]
    for name in sorted(set(want_adapters) | set(have_adapters)):
        if name not in have_adapters:
            out.append(f"adapter {name}: locked, but not served")
        elif name not in want_adapters:
            out.append(f"adapter {name}: served, but not in the lock")
        else:
            files(f"adapter {name}", want_adapters[name].get("files", {}), have_adapters[name]["files"])
    return out
