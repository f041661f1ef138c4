"""`system_fingerprint`: one short id for everything that decides which tokens a request gets back.

It is the digest of the engine's lock record (keel.registry.lock): the sha256 of every weight,
config, tokenizer and chat-template file, the dtype, device, quantization, weight dtype, the kernels
that compute each layer (keel.kernels.backend), and keel's version. It stays the same across restarts
and across copies of the same files on other machines (no paths, clocks or modification times).
"""

from __future__ import annotations

import os

from keel.registry.lock import build, fingerprint, model_files


def system_fingerprint(engine) -> str:
    return fingerprint(build(engine))


def created_time(engine) -> int:
    """A fixed "created" time for /v1/models: when the newest model file was written."""
    files = model_files(engine)
    return int(max((os.path.getmtime(f) for f in files), default=0))
