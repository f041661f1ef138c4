"""`keel eval SUITE.jsonl --a TARGET --b TARGET [--out DIR] [--min-exact-match X] [--min-similarity Y]`:
ask both targets every case, compare, write report.md and report.html (and each target's answers, so a
rerun resumes), and exit 1 when a threshold is missed: a gate for CI or an upgrade."""

from __future__ import annotations

import json
import os
import sys


def add_eval_parser(sub):
    p = sub.add_parser("eval", help="measure how far two models' answers drift apart on a suite of chats",
                       usage="keel eval SUITE.jsonl --a TARGET --b TARGET [options]")
    p.add_argument("suite", metavar="SUITE.jsonl", help="one case per line: {\"messages\": [...], \"expected\"?, "
                   "\"schema\"?, \"tools\"?, \"temperature\"?, \"max_tokens\"?, \"seed\"?, \"samples\"?}")
    for side in ("a", "b"):
        p.add_argument(f"--{side}", required=True, metavar="TARGET",
                       help="a local model (folder, GGUF file, hub id, or builtin) or an OpenAI-compatible URL")
        p.add_argument(f"--{side}-model", default=None, help=f"the model to ask at a URL target {side.upper()} "
                       "(default: the first it lists)")
        p.add_argument(f"--{side}-quantize", default=None, choices=["int8", "int4", "gguf", "none"],
                       help=f"quantization of a local target {side.upper()}")
    p.add_argument("--out", default="eval-report", metavar="DIR", help="where the report and answers go")
    p.add_argument("--min-exact-match", type=float, default=None, help="fail (exit 1) below this share")
    p.add_argument("--min-similarity", type=float, default=None, help="fail (exit 1) below this mean similarity")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per target")
    p.set_defaults(func=cmd_eval)
    return p


def add_import_parser(sub):
    """`keel eval import` (keel.cli routes `eval import` here)."""
    p = sub.add_parser("eval-import", help="turn a hosted API's request/response logs into an eval suite "
                       "(or a fine-tuning file)", usage="keel eval import LOGS.jsonl [--requests FILE] [-o OUT] "
                       "[--as-finetune]")
    p.add_argument("logs", metavar="LOGS.jsonl", help="logged {request, response} pairs, or Batch API output")
    p.add_argument("--requests", default=None, metavar="FILE", help="the Batch API input file (to join by custom_id)")
    p.add_argument("--output", "-o", default=None, help="where to write (default: LOGS.suite.jsonl or "
                   "LOGS.finetune.jsonl)")
    p.add_argument("--as-finetune", action="store_true",
                   help="write a fine-tuning file (the hosted answers as assistant turns) instead of a suite")
    p.set_defaults(func=cmd_import)
    return p


def cmd_import(args) -> int:
    from keel.evals.importer import to_finetune, to_suite
    records, skipped = (to_finetune if args.as_finetune else to_suite)(args.logs, args.requests)
    out = args.output or os.path.splitext(args.logs)[0] + (".finetune.jsonl" if args.as_finetune else ".suite.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    what = "fine-tuning examples" if args.as_finetune else "eval cases"
    print(f"keel: wrote {len(records)} {what} to {out}" + (f" ({skipped} failed responses skipped)" if skipped else ""),
          file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from keel.evals import report
    from keel.evals.metrics import compare, summary
    from keel.evals.run import collect
    from keel.evals.suite import load_suite
    from keel.evals.targets import Target
    cases = load_suite(args.suite)
    os.makedirs(args.out, exist_ok=True)
    answers = {}
    for side in ("a", "b"):
        target = Target(getattr(args, side), getattr(args, f"{side}_model"), getattr(args, f"{side}_quantize"))
        bar = _bar(f"target {side.upper()}")
        answers[side] = collect(target, cases, os.path.join(args.out, f"answers-{side}.jsonl"), args.concurrency,
                                bar)
        answers[f"{side}_name"] = target.describe()
    from keel.embed.model import EmbeddingModel
    embedder = EmbeddingModel()

    def embed(texts):
        import torch
        vectors = embedder.embed([embedder.encode(t or " ")[:embedder.max_len] for t in texts])
        return torch.nn.functional.normalize(vectors, dim=-1)
    results = compare(cases, answers["a"], answers["b"], embed)
    s = summary(results)
    verdict, ok = [], True
    for name, key, floor in (("exact match", "exact_match", args.min_exact_match),
                             ("similarity", "similarity", args.min_similarity)):
        if floor is not None:
            passed = s[key] >= floor
            ok &= passed
            verdict.append(f"{'PASS' if passed else 'FAIL'}: {name} {s[key]:.3f} (threshold {floor})")
    title = f"keel eval: {os.path.basename(args.suite)}"
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report.markdown(title, answers["a_name"], answers["b_name"], s, results, verdict))
    with open(os.path.join(args.out, "report.html"), "w", encoding="utf-8") as f:
        f.write(report.html(title, answers["a_name"], answers["b_name"], s, results, verdict))
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(s, f, indent=1)
    errors = f", errors A {s['errors_a']} B {s['errors_b']}" if s["errors_a"] or s["errors_b"] else ""
    print(f"keel eval: {s['cases']} cases: exact match {s['exact_match']:.3f}, similarity {s['similarity']:.3f}"
          f"{errors}; report in {os.path.join(args.out, 'report.html')}", file=sys.stderr)
    for v in verdict:
        print(f"keel eval: {v}", file=sys.stderr)
    return 0 if ok else 1


def _bar(desc: str):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    state = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, initial=done, desc=desc, unit="answer")
        else:
            state["bar"].n = done
            state["bar"].refresh()
    return progress
