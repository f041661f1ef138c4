"""`keel serve`: its options, and serving: bind the port, load the model, print a summary, run uvicorn
until a signal, stop cleanly."""

from __future__ import annotations

import argparse
import os
import sys

from keel.errors import KeelError
from keel.config import LoRAConfig
from keel.options import add_options, engine_config_from_args


def add_serve_parser(sub, model_args) -> argparse.ArgumentParser:
    """The `serve` subcommand; model_args adds the options every model-loading command shares."""
    s = sub.add_parser("serve", help="serve a model behind the OpenAI HTTP API")
    s.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model folder or file name)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (prefer $KEEL_API_KEY or --api-key-file: a "
                        "command-line key shows in the process list; none of them: open)")
    s.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file")
    s.add_argument("--api-keys", action="store_true",
                   help="also accept the keys of keel's database (`keel keys create`): each scoped to models and "
                        "adapters, with rate limits, a token budget and usage; --api-key stays an admin key")
    s.add_argument("--enable-docs", action="store_true",
                   help="serve /docs (keel's own page, works offline) and /openapi.json, open without the API "
                        "key; off by default")
    s.add_argument("--state-db", default=None, metavar="PATH",
                   help="SQLite file for stored Responses API responses (default: $KEEL_STATE_DB, else "
                        "~/.local/share/keel/state.sqlite3; ':memory:' keeps nothing across restarts)")
    s.add_argument("--request-timeout", type=float, default=0,
                   help="seconds a request may generate; then it ends as if max_tokens were reached "
                        "(finish_reason 'length'); 0: no limit")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds requests in flight may take to finish after Ctrl-C or SIGTERM (then they are "
                        "cancelled); a second Ctrl-C ends them at once")
    s.add_argument("--default-max-tokens", type=int, default=1024,
                   help="completion tokens for a request that sets no max_tokens (0: the rest of the context, "
                        "as OpenAI's API)")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="most requests waiting for a batch slot; beyond it requests get 429 with Retry-After")
    li = s.add_argument_group("limits per client (past one: a 4xx in OpenAI's error shape)")
    li.add_argument("--max-request-bytes", type=int, default=32 * 2**20, help="largest request body (413 past it)")
    li.add_argument("--max-upload-bytes", type=int, default=512 * 2**20,
                    help="largest POST /v1/files upload (a training file; 413 past it)")
    li.add_argument("--body-timeout", type=float, default=60.0, help="seconds to send the request body (408 after)")
    li.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a connection may hold an unfinished request head before it is closed")
    li.add_argument("--max-connections", type=int, default=1000,
                    help="connections and requests served at once; past it 503 (0: no limit)")
    li.add_argument("--max-embedding-inputs", type=int, default=2048, help="most inputs in one embeddings request")
    em = s.add_argument_group("embeddings (POST /v1/embeddings)")
    em.add_argument("--embedding-model", default=None, metavar="PATH",
                    help="a BERT-family embedding model folder (default: the built-in all-MiniLM-L6-v2 when installed)")
    em.add_argument("--no-embedding-model", action="store_true", help="serve no embedding model")
    lo = s.add_argument_group("LoRA adapters (the request's `model` field names one; --enable-lora is implied by "
                              "--lora, --lora-dir and fine-tuning)")
    add_options(lo, LoRAConfig)
    lo.add_argument("--lora", action="append", metavar="NAME=PATH",
                    help="an adapter folder (PEFT format) served as NAME, validated at start; repeatable")
    lo.add_argument("--lora-dir", action="append", metavar="DIR",
                    help="every subfolder of DIR is an adapter named after it, registered without loading "
                         "(validated at first use); repeatable")
    lo.add_argument("--no-lora-updates", action="store_true",
                    help="turn off POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    lo.add_argument("--allowed-lora-path", action="append", metavar="DIR",
                    help="a folder POST /v1/load_lora_adapter may load adapters from (besides --lora-dir "
                         "folders); repeatable")
    lo.add_argument("--allow-any-lora-path", action="store_true",
                    help="let POST /v1/load_lora_adapter read any folder the server can (trusted clients only)")
    lo.add_argument("--show-lora-paths", action="store_true", help="/v1/models shows adapters' folders as `root`")
    s.add_argument("--guardrails", default=None, metavar="PATH",
                   help="content policies on prompts and answers (YAML: see keel/gateway/guardrails.py); their "
                        "version is part of system_fingerprint")
    pin = s.add_argument_group("pinning")
    pin.add_argument("--lock", default=None, metavar="PATH",
                     help="refuse to start unless the model, the --lora adapters and the output-shaping settings "
                          "match this keel.lock (written by `keel lock`)")
    pin.add_argument("--accept-lock-changes", action="store_true", help="with --lock: warn about differences, start anyway")
    ft = s.add_argument_group("files and fine-tuning")
    ft.add_argument("--no-fine-tuning", action="store_true",
                    help="turn off /v1/files and /v1/fine_tuning/jobs (and with them the adapters they would serve)")
    ft.add_argument("--data-dir", default=None, metavar="DIR",
                    help="where uploads, jobs and adapters are kept ($KEEL_DATA_DIR, else ~/.local/share/keel)")
    ft.add_argument("--database-url", default=None, metavar="URL",
                    help="SQLAlchemy URL of the files/jobs database ($KEEL_DATABASE_URL, else SQLite in --data-dir; "
                         "postgresql://... for Postgres)")
    ft.add_argument("--fine-tuning-threads", type=int, default=0, metavar="N",
                    help="CPU threads of a training worker (default: half the cores; serving keeps the rest)")
    s.set_defaults(func=cmd_serve)
    return s


def _lora_arg(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise KeelError(f"--lora {spec!r}: write it as NAME=PATH")
    return name.strip(), path.strip()


def _embedding_model(args, chat_name: str):
    """The embedding model to serve beside the chat model: --embedding-model, else the built-in one
    when its package is installed (a missing package is not an error), none with --no-embedding-model."""
    from keel.embed import EmbeddingModel, builtin_embedding_path
    if args.no_embedding_model:
        return None
    if args.embedding_model is None and builtin_embedding_path() is None:
        return None
    model = EmbeddingModel(args.embedding_model, device=args.device)
    if model.name == chat_name:
        raise KeelError(f"the embedding model and the chat model are both named {chat_name!r}")
    return model


def cmd_serve(args) -> int:
    sock = _bind(args.host, args.port)  # a port in use fails now, before torch is even imported
    try:
        return _serve(args, sock)
    finally:
        sock.close()


def _serve(args, sock) -> int:
    import torch
    import uvicorn

    from keel.engine.llm_engine import LLMEngine
    from keel.models.loader import DEFAULT_MODEL_NAME
    from keel.server import create_app
    from keel.server.adapters import LoRAPolicy
    from keel.server.limits import ServerLimits, uvicorn_settings
    from keel.store import ResponseStore, default_state_path

    implied = bool(args.lora or args.lora_dir or not args.no_fine_tuning)
    config = engine_config_from_args(args, **({"enable_lora": True} if implied else {}))
    adapters = [_lora_arg(spec) for spec in args.lora or []]  # bad syntax fails before the model loads
    api_key = _api_key(args)
    store = ResponseStore(args.state_db or default_state_path())  # an unusable one fails before the model loads
    policies = None
    if args.guardrails:
        from keel.gateway.guardrails import load as load_guardrails
        policies = load_guardrails(args.guardrails)  # a bad policy file fails before the model loads
    limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_upload_bytes=args.max_upload_bytes,
                          body_timeout_s=args.body_timeout,
                          header_timeout_s=args.header_timeout, max_connections=args.max_connections or None,
                          max_embedding_inputs=args.max_embedding_inputs)
    # The engine steps on its own thread. On a CPU every OpenMP thread pool counts against the cores:
    # once the main thread has started one (by loading the model with several threads), libgomp
    # sees more threads than cores and its workers sleep between parallel regions instead of spinning,
    # which slows every decode step on the engine thread. So the main thread loads with one thread (no
    # pool; OpenMP's count is per thread) and the engine thread runs with the machine's count
    # (bench/serve.py measures both).
    engine_threads = None
    if args.device in (None, "cpu") and not torch.cuda.is_available():
        engine_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    engine = LLMEngine(config=config)
    name = args.served_model_name
    if not name:
        # a hub id is served under that id; a local folder or file under its own name
        local = args.model is None or os.path.exists(args.model)
        name = DEFAULT_MODEL_NAME if args.model is None else engine.model_name if local else args.model
    embedder = _embedding_model(args, name)
    served = {name, *([embedder.name] if embedder else [])}
    for adapter, _ in adapters:
        if adapter in served:
            raise KeelError(f"--lora {adapter}=...: that is the name of a served model; give the adapter another")
    for folder in args.lora_dir or []:
        names = engine.adapters.register_dir(folder)
        for clash in served & set(names):
            engine.adapters.remove(clash)
            print(f"keel: skipped adapter {clash} in {folder}: a served model has that name", file=sys.stderr)
        print(f"keel: registered {len(set(names) - served)} adapters from {folder}", file=sys.stderr, flush=True)
    for adapter, path in adapters:
        engine.adapters.add(adapter, path)  # validated now: a bad adapter stops the start with its reason
    if args.lock:
        from keel.registry.cli import verify
        verify(args.lock, engine, dict(adapters), args.accept_lock_changes)
    roots = None if args.allow_any_lora_path else [*(args.lora_dir or []), *(args.allowed_lora_path or [])]
    api_keys = None
    if args.api_keys:
        from keel.store.db import Database, data_dir, default_url
        from keel.store.keys import KeyStore
        api_keys = KeyStore(Database(args.database_url or default_url(args.data_dir or data_dir())))
    fine_tuning = None
    if not args.no_fine_tuning:
        from keel.finetune.jobs import FineTuning, ServedModel
        base = ServedModel(name, engine.model_path, engine.max_model_len, engine.tokenizer, engine.device.type,
                         engine.lora.config.max_lora_rank)
        fine_tuning = FineTuning(base, args.data_dir, args.database_url, register=engine.adapters.add,
                                 threads=args.fine_tuning_threads)
    app = create_app(engine, served_model_name=name, api_key=api_key, max_waiting=args.max_waiting,
                     allow_lora_updates=not args.no_lora_updates, embedding_model=embedder,
                     engine_threads=engine_threads, limits=limits, enable_docs=args.enable_docs,
                     lora_policy=LoRAPolicy(roots=roots, show_paths=args.show_lora_paths),
                     default_max_tokens=args.default_max_tokens or None,
                     request_timeout_s=args.request_timeout or None,
                     response_store=store, fine_tuning=fine_tuning, api_keys=api_keys,
                     guardrails=policies)
    print(_summary(engine, name, embedder, sock, args, fine_tuning), file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level.lower(), timeout_graceful_shutdown=args.shutdown_timeout,
                            **uvicorn_settings(limits))
    try:
        _run_uvicorn(config, sock)
    finally:  # also after a third Ctrl-C, when uvicorn skips the app's own shutdown
        app.state.keel.client.shutdown()
        if app.state.keel.embeddings is not None:
            app.state.keel.embeddings.shutdown()
    return 0


def _summary(engine, name: str, embedder, sock, args, fine_tuning=None) -> str:
    """What is being served, how, and where: printed once the socket is bound and the model loaded."""
    import keel
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    kernel = engine.backend.implementation()
    quant = engine.quantization.describe() if engine.quantization else "none"
    weights = engine.weight_bytes()["total"] / 1e6
    tokens = engine.num_blocks * engine.cache_config.block_size
    lines = [f"keel {keel.__version__}: serving {name}",
             f"  model       {engine.model_path}",
             f"  compute     {engine.device.type}, {str(engine.dtype).removeprefix('torch.')}, {kernel}",
             f"  weights     {weights:.0f} MB, quantization: {quant}",
             f"  KV cache    {tokens} tokens ({engine.num_blocks} blocks of {engine.cache_config.block_size}; "
             f"{engine.kv_cache_sized}); context {engine.max_model_len}, up to "
             f"{engine.scheduler_config.max_num_seqs} sequences at once"]
    lines += [f"  {'kernels' if i == 0 else '':<11} {kind}: {impl}" for i, (kind, impl) in enumerate(engine.backend.table().items())]
    if engine.lora is not None:
        lines.append(f"  adapters    {len(engine.adapters.list())} registered, {engine.lora.config.max_loras} resident at once")
    if embedder is not None:
        lines.append(f"  embeddings  {embedder.name}")
    if fine_tuning is not None:
        from keel.store.db import redacted
        lines.append(f"  fine-tuning /v1/files, /v1/fine_tuning/jobs: data in {fine_tuning.folder}, "
                     f"database {redacted(fine_tuning.db.url)}, workers on {fine_tuning.threads} threads")
    lines.append(f"  listening   http://{shown_host}:{port}/v1 (Ctrl-C to stop)")
    return "\n".join(lines)


def _bind(host: str, port: int):
    """A listening socket on host:port, or a KeelError saying why not (the port is in use, say)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise KeelError(f"--host {host}: cannot resolve it ({e})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = " (another server is using it: pick another with --port)" if e.errno in (98, 48, 10048) else ""
        raise KeelError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


def _run_uvicorn(config, sock) -> None:
    """Serve until SIGINT or SIGTERM. The first stops accepting connections and lets requests in flight
    finish for --shutdown-timeout seconds (then uvicorn cancels them: their engine requests are
    aborted). A second Ctrl-C ends every request in flight at once, as if each had reached max_tokens,
    so their clients get complete answers and the same clean shutdown follows; a third is uvicorn's
    own immediate stop. uvicorn re-raises the signals it caught once it is done, which would end the
    process with a KeyboardInterrupt traceback or a SIGTERM death; ignoring them from here on makes the
    exit a clean 0."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        expired = False

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT and not self.expired:
                self.expired = True
                config.app.state.keel.client.expire_all()
                return
            super().handle_exit(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)  # what uvicorn restores, and re-raises into, when it is done
    Server(config).run(sockets=[sock])


def _api_key(args) -> str | None:
    """--api-key-file, else --api-key (visible in the process list: the others are not), else $KEEL_API_KEY."""
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise KeelError(f"--api-key-file {args.api_key_file}: cannot read it ({e})") from None
        if not key:
            raise KeelError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get("KEEL_API_KEY") or None
