"""`system_fingerprint`: one short id for everything that decides which tokens a request gets back.

It must change when the weights, tokenizer, chat template, dtype, quantization, device kind, the
kernels that compute each layer (keel.kernels.backend) or keel itself change, and stay the same across restarts and across copies of the same files on other machines
(so no clocks and no modification times). Small files are hashed whole. Weight files are too big to hash
at every start, so each one contributes its size and evenly spaced samples of its bytes: any
retraining or fine-tune changes bytes everywhere, and the header (tensor names, shapes, dtypes)
is always in the first sample.
"""

from __future__ import annotations

import hashlib
import os

import keel

SMALL_FILE = 1 << 20
SAMPLES = 16
SAMPLE_BYTES = 64 << 10
# Files next to the weights that shape the output (tokenization, chat template, stop ids, config).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.json", "chat_template.jinja")


def digest_file(h, path: str) -> None:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= SMALL_FILE:
            h.update(f.read())
            return
        step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
        for k in range(SAMPLES):
            f.seek(k * step)
            h.update(f.read(SAMPLE_BYTES))


def model_files(engine) -> list[str]:
    files = list(engine.checkpoint_files)
    folder = engine.model_path if os.path.isdir(engine.model_path) else None
    if folder:
        files += [os.path.join(folder, n) for n in SIDE_FILES if os.path.isfile(os.path.join(folder, n))]
    return files


def system_fingerprint(engine) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(model_files(engine), key=os.path.basename):
        digest_file(h, path)
    device = getattr(getattr(engine, "device", None), "type", "cpu")
    quant = getattr(engine, "quantization", None)  # quantizing at load changes the weights the files hold
    quant = quant.describe() if quant is not None else "none"
    h.update(f"|dtype={engine.dtype}|device={device}|quant={quant}|keel={keel.__version__}".encode())
    if getattr(engine, "weight_dtype", "auto") == "bfloat16":  # rounds weights; "auto" keeps them exact
        h.update(b"|weights=bfloat16")
    backend = getattr(engine, "backend", None)  # which kernels compute: they round differently
    if backend is not None:
        h.update(f"|kernels={backend.digest()}".encode())
    return "fp_" + h.hexdigest()[:10]


def created_time(engine) -> int:
    """A fixed "created" time for /v1/models: when the newest model file was written."""
    files = model_files(engine)
    return int(max((os.path.getmtime(f) for f in files), default=0))
