"""sha256 of model and adapter files, cached across starts.

A weight file is hashed whole (a byte changed anywhere changes its digest), once: the digest is kept in
a small JSON cache in keel's data folder, keyed by the file's real path and valid while its size,
modification time (ns) and inode stay the same. A file restored with its old modification time by hand
would be trusted from the cache; `keel lock --rehash` reads every byte again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

_lock = threading.Lock()
_cache: dict[str, dict] | None = None
CHUNK = 8 << 20


def _cache_path() -> str:
    from keel.store.db import data_dir
    return os.path.join(data_dir(), "digests.json")


def _load() -> dict:
    global _cache
    if _cache is None:
        try:
            with open(_cache_path()) as f:
                _cache = json.load(f)
        except (OSError, ValueError):
            _cache = {}
    return _cache


def _save() -> None:
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.part"
        with open(tmp, "w") as f:
            json.dump(_cache, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only data folder: digests are computed again next time


def sha256_file(path: str, rehash: bool = False) -> str:
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    with _lock:
        hit = _load().get(real)
        if hit is not None and hit["stamp"] == stamp and not rehash:
            return hit["sha256"]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if st.st_size >= (1 << 20):  # worth remembering; small files are hashed again faster than the cache is read
        with _lock:
            _load()[real] = {"stamp": stamp, "sha256": digest}
            _save()
    return digest
