"""The `keel` command: generate, chat, serve, quantize, finetune, eval, lock, and the model store
(pull, list, show, rm)."""

from __future__ import annotations

import argparse
import logging
import sys

from keel.errors import KeelError
from keel.options import add_engine_options, engine_config_from_args
from keel.serve_cli import add_serve_parser


def _model_args(p: argparse.ArgumentParser) -> None:
    """The options of every command that loads a model: every field of keel.config's load, compute,
    cache and scheduler dataclasses (generated: see keel.options)."""
    add_engine_options(p, ("load", "compute", "cache", "scheduler"))


class _Help(argparse.HelpFormatter):
    """Shows each option's default, unless it is empty or the help already says it."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text or d in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {', '.join(map(str, d)) if isinstance(d, list) else d})"


def _log_args(p: argparse.ArgumentParser, default) -> None:
    """--log-level and --quiet, accepted before or after the subcommand."""
    p.add_argument("--log-level", default=default, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="what to log (default: INFO for serve, with one line per request; WARNING otherwise)")
    p.add_argument("--quiet", "-q", action="store_true", default=default, help="log warnings and errors only")


def _engine_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--seed", type=int, default=None, help="seed for sampled generation")


def _llm(args):
    from keel import LLM
    return LLM(config=engine_config_from_args(args))


def _params(args):
    from keel import SamplingParams
    return SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)


def cmd_generate(args) -> int:
    llm = _llm(args)
    tok = llm.tokenizer
    ids = tok.encode(args.prompt) if args.raw else tok.encode_chat([{"role": "user", "content": args.prompt}])
    try:
        _stream(llm.engine, ids, _params(args))
    except KeyboardInterrupt:
        print()
        return 130
    print()
    return 0


def _stream(engine, ids: list[int], params) -> str:
    """Generate for one prompt, printing text as it comes; returns the whole text. Ctrl-C aborts the
    request (and is raised again)."""
    rid = engine.new_request_id()
    engine.add_request(rid, ids, params)
    text = ""
    try:
        done = False
        while not done:
            for out in engine.step():
                if out.request_id == rid:
                    print(out.outputs[0].delta_text, end="", flush=True)
                    text, done = out.outputs[0].text, out.finished
    except BaseException:
        engine.abort_request(rid)
        raise
    return text


def cmd_chat(args) -> int:
    llm = _llm(args)
    params = _params(args)
    engine, tok = llm.engine, llm.tokenizer
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(f"keel chat with {engine.model_name} — Ctrl-D or /bye to leave, /clear to forget the conversation")
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/bye", "/exit", "/quit"):
            return 0
        if line == "/clear":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode_chat(history)
        reply = ""
        try:
            reply = _stream(engine, ids, params)
        except KeyboardInterrupt:
            pass
        except KeelError as e:
            print(f"error: {e}")
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    import keel
    parser = argparse.ArgumentParser(prog="keel", description="Run open LLMs on your own machines.",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"keel {keel.__version__}")
    _log_args(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt and exit", usage="keel generate [options] [MODEL] PROMPT")
    g.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                   help="the prompt (sent through the chat template unless --raw), after the model if given")
    g.add_argument("--raw", action="store_true", help="complete the prompt text as is, without the chat template")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="chat with a model in the terminal")
    c.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    c.add_argument("--system", default=None, help="system message")
    _engine_args(c)
    c.set_defaults(func=cmd_chat)
    s = add_serve_parser(sub, _model_args)
    from keel.quant.cli import add_quantize_parser
    add_quantize_parser(sub)
    from keel.finetune.cli import add_finetune_parser
    f = add_finetune_parser(sub, _model_args)
    from keel.evals.cli import add_eval_parser, add_import_parser
    e = add_eval_parser(sub)
    ei = add_import_parser(sub)
    from keel.registry.cli import add_lock_parser, add_store_parsers
    lk = add_lock_parser(sub, _model_args)
    store_parsers = add_store_parsers(sub)
    from keel.gateway.cli import add_gateway_parser, add_keys_parser
    ky = add_keys_parser(sub)
    gw = add_gateway_parser(sub)
    for p in (g, c, s, f, e, ei, lk, ky, gw, *store_parsers):
        p.formatter_class = _Help
        _log_args(p, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "import"]:  # a subcommand of eval, whose own first argument is the suite
        argv = ["eval-import", *argv[2:]]
    args = parser.parse_args(argv)
    if getattr(args, "model_pos", None):
        args.model = args.model_pos
    if args.command == "generate":
        if len(args.words) > 2:
            parser.error("generate takes [MODEL] PROMPT: quote a prompt of several words")
        if len(args.words) == 2:
            if args.model is not None:
                parser.error("generate: give the model once, as MODEL or --model")
            args.model = args.words[0]
        args.prompt = args.words[-1]
    level = getattr(args, "log_level", None) or ("INFO" if args.command in ("serve", "gateway") else "WARNING")
    if getattr(args, "quiet", False):
        level = "WARNING"
    args.log_level = level
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeelError as e:
        print(f"keel: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading, say: no traceback
        print("keel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
