"""`keel lock [MODEL] [--lora NAME=PATH ...] [-o keel.lock]` writes the lock of what `keel serve` with the
same options would serve; `keel serve --lock keel.lock` checks it (see verify)."""

from __future__ import annotations

import logging
import sys

from keel.errors import KeelError

log = logging.getLogger("keel.registry")


def add_lock_parser(sub, model_args):
    p = sub.add_parser("lock", help="pin a model, its adapters and the settings that shape its output in keel.lock",
                       usage="keel lock [MODEL] [--lora NAME=PATH ...] [options]")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    model_args(p)
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="an adapter to pin (repeatable)")
    p.add_argument("--output", "-o", default="keel.lock", help="the lock file to write")
    p.add_argument("--rehash", action="store_true", help="read every byte of every file again (no cached digests)")
    p.set_defaults(func=cmd_lock)
    return p


def add_store_parsers(sub):
    p = sub.add_parser("pull", help="add a model to keel's store: a hub id (MODEL[@REVISION]), a folder or a GGUF file",
                       usage="keel pull MODEL[@REVISION] | PATH [--name NAME]")
    p.add_argument("source", help="org/name[@revision] on the Hugging Face hub, or a local folder or .gguf file")
    p.add_argument("--name", default=None, help="the name to store a local import under (default: its folder or file name)")
    p.add_argument("--lock", default=None, metavar="PATH",
                   help="also write a keel.lock pinning the pulled model as `keel serve NAME` loads it by default")
    p.set_defaults(func=cmd_pull)
    ls = sub.add_parser("list", help="the models in keel's store")
    ls.set_defaults(func=cmd_list)
    sh = sub.add_parser("show", help="a stored model: source, config, chat template, license, files with sha256")
    sh.add_argument("ref", metavar="NAME[@REVISION]")
    sh.add_argument("--verify", action="store_true", help="hash every file again and report any that changed")
    sh.set_defaults(func=cmd_show)
    rm = sub.add_parser("rm", help="remove a model from keel's store (files no other model uses are deleted)")
    rm.add_argument("ref", metavar="NAME[@REVISION]")
    rm.set_defaults(func=cmd_rm)
    return [p, ls, sh, rm]


def cmd_pull(args) -> int:
    import os

    from keel.models.loader import gguf_served_name
    from keel.registry.store import ModelStore
    store = ModelStore()
    src = args.source
    if os.path.exists(src):
        name = args.name or (gguf_served_name(src) if src.endswith(".gguf") else os.path.basename(os.path.normpath(src)))
        entry = store.add(src, name, None, f"local:{os.path.abspath(src)}")
    else:
        repo, _, rev = src.partition("@")
        entry = store.pull(repo, rev or None)
    print(f"keel: stored {entry.ref} ({entry.size / 1e6:.1f} MB, {len(entry.files)} files); serve it with: "
          f"keel serve {entry.name}", file=sys.stderr)
    if args.lock:
        from keel.engine.llm_engine import LLMEngine
        from keel.registry.lock import build, write
        write(build(LLMEngine(entry.path)), args.lock)
        print(f"keel: wrote {args.lock}", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    from keel.registry.store import ModelStore
    rows = [("NAME", "REVISION", "SIZE", "DIGEST", "FORMAT", "SOURCE")]
    for e in ModelStore().entries():
        rows.append((e.name, e.revision[:12], f"{e.size / 1e6:.1f} MB", e.digest, e.format, e.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_show(args) -> int:
    import json
    import os

    from keel.registry.store import ModelStore
    store = ModelStore()
    e = store.find(args.ref)
    if e is None:
        raise KeelError(f"no stored model {args.ref!r} (see keel list)")
    folder = e.path if os.path.isdir(e.path) else os.path.dirname(e.path)
    print(f"{e.ref}\n  source    {e.source}\n  format    {e.format}\n  size      {e.size / 1e6:.1f} MB\n  path      {e.path}")
    cfg = os.path.join(folder, "config.json")
    if os.path.isfile(cfg):
        c = json.load(open(cfg))
        print(f"  config    {', '.join(c.get('architectures') or [])} {c.get('model_type', '')}, "
              f"{c.get('num_hidden_layers')} layers, hidden {c.get('hidden_size')}, vocab {c.get('vocab_size')}")
    tc = os.path.join(folder, "tokenizer_config.json")
    has_template = os.path.isfile(os.path.join(folder, "chat_template.jinja")) or (
        os.path.isfile(tc) and bool(json.load(open(tc)).get("chat_template")))
    print(f"  template  {'yes' if has_template or e.format == 'gguf' else 'none'}")
    lic = [f for f in e.files if f.upper().startswith("LICENSE")]
    print(f"  license   {', '.join(lic) if lic else 'no LICENSE file (see the model card)'}")
    print("  files")
    for rel, digest in sorted(e.files.items()):
        print(f"    {digest}  {rel}")
    if args.verify:
        bad = store.verify(e)
        for b in bad:
            print(f"keel: CORRUPTED {b}", file=sys.stderr)
        return 1 if bad else 0
    return 0


def cmd_rm(args) -> int:
    from keel.registry.store import ModelStore
    entry = ModelStore().remove(args.ref)
    print(f"keel: removed {entry.ref}", file=sys.stderr)
    return 0


def cmd_lock(args) -> int:
    from keel.cli import _llm
    from keel.registry.lock import build, fingerprint, write
    from keel.serve_cli import _lora_arg
    adapters = dict(_lora_arg(spec) for spec in args.lora or [])
    engine = _llm(args).engine
    record = build(engine, adapters, rehash=args.rehash)
    write(record, args.output)
    files = len(record["model"]["files"]) + sum(len(a["files"]) for a in record["adapters"].values())
    print(f"keel: wrote {args.output}: {files} files, fingerprint {fingerprint(record)}", file=sys.stderr)
    return 0


def verify(path: str, engine, adapters: dict[str, str], accept: bool) -> None:
    """Compare what is loaded with the lock at `path`: KeelError naming what differs, or (accept) a
    warning per difference."""
    from keel.registry.lock import build, differences, read
    diffs = differences(read(path), build(engine, adapters))
    if not diffs:
        log.info("%s matches what is loaded", path)
        return
    if not accept:
        shown = "\n  ".join(diffs[:10]) + (f"\n  ... and {len(diffs) - 10} more" if len(diffs) > 10 else "")
        raise KeelError(f"what would be served differs from {path}:\n  {shown}\n(refusing to start; run `keel lock` "
                        f"again to pin the new files, or pass --accept-lock-changes)")
    for d in diffs:
        log.warning("%s: %s (accepted: --accept-lock-changes)", path, d)
