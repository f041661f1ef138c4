"""`keel keys create|list|revoke|usage`: API keys in keel's database (what `keel serve --api-keys` accepts);
`keel gateway --config gateway.yaml`: one OpenAI endpoint in front of several backends, with failover."""

from __future__ import annotations

import argparse
import json
import sys


def add_keys_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("keys", help="create, list and revoke API keys; show their usage")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="keel's data folder ($KEEL_DATA_DIR)")
    p.add_argument("--database-url", default=None, metavar="URL", help="the database ($KEEL_DATABASE_URL)")
    ks = p.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="a new key: its secret is printed once and never stored")
    c.add_argument("name", help="what the key is for (a tenant, an app)")
    c.add_argument("--models", default=None, metavar="PATTERNS",
                   help="comma-separated model and adapter names it may see and call; * matches any text "
                        "(acme-*); default: every model")
    c.add_argument("--rpm", type=int, default=None, help="requests per minute (default: no limit)")
    c.add_argument("--tpm", type=int, default=None, help="tokens per minute, prompt and completion (default: no limit)")
    c.add_argument("--budget", type=int, default=None, metavar="TOKENS", help="tokens over the key's life")
    c.add_argument("--admin", action="store_true", help="may manage keys through /admin and call every model")
    ks.add_parser("list", help="the keys (secrets are never shown again)").add_argument(
        "--all", action="store_true", help="revoked keys too")
    r = ks.add_parser("revoke", help="revoke a key: it fails at once")
    r.add_argument("key_id")
    u = ks.add_parser("usage", help="requests, errors, tokens and latency per key and model")
    u.add_argument("key_id", nargs="?")
    p.set_defaults(func=cmd_keys)
    return p


def cmd_keys(args) -> int:
    from keel.errors import KeelError
    from keel.store.db import Database, data_dir, default_url
    from keel.store.keys import KeyStore
    store = KeyStore(Database(args.database_url or default_url(args.data_dir or data_dir())))
    cmd = args.keys_command
    if cmd == "create":
        models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
        try:
            key, secret = store.create(args.name, models, args.rpm, args.tpm, args.budget, args.admin)
        except ValueError as e:
            raise KeelError(str(e)) from None
        print(json.dumps(key.card()), file=sys.stderr)
        print(secret)  # alone on stdout, so `KEY=$(keel keys create NAME)` captures it
    elif cmd == "list":
        for key in store.list(include_revoked=args.all):
            print(json.dumps(key.card()))
    elif cmd == "revoke":
        if not store.revoke(args.key_id):
            raise KeelError(f"no live key {args.key_id}")
        print(f"keel: revoked {args.key_id}", file=sys.stderr)
    else:
        for r in store.usage(args.key_id):
            print(json.dumps(r))
    return 0


def add_gateway_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("gateway", help="serve one OpenAI endpoint in front of several backends, with failover",
                       usage="keel gateway --config gateway.yaml [--host H] [--port P]")
    p.add_argument("--config", required=True, metavar="PATH",
                   help="model aliases and their backends (YAML; see keel/gateway/config.py)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="require 'Authorization: Bearer KEY' with the key in this file ($KEEL_API_KEY also works)")
    p.set_defaults(func=cmd_gateway)
    return p


def cmd_gateway(args) -> int:
    import uvicorn

    from keel.gateway.config import load
    from keel.gateway.proxy import create_gateway_app
    from keel.serve_cli import _bind
    from keel.serve_cli import _api_key
    settings = load(args.config)
    key = _api_key(argparse.Namespace(api_key_file=args.api_key_file, api_key=None))  # as keel serve reads it
    sock = _bind(args.host, args.port)
    try:
        app = create_gateway_app(settings, key)
        aliases = ", ".join(f"{a} -> {len(s.backends)} backend(s)" for a, s in settings.models.items())
        print(f"keel gateway: {aliases}; listening on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower())).run(sockets=[sock])
    finally:
        sock.close()
    return 0
