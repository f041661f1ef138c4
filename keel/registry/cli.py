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
