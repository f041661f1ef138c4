"""Per-token mask cost of the grammar libraries on this CPU, with the built-in model's tokenizer.

For each library: build the tokenizer adapter (once per engine), compile one JSON schema (once per
request), then walk a random valid path through the grammar: at each step fill the vocabulary
bitmask and pick a random allowed token (seeded, so every library walks a path of the same kind).
Prints ms per mask fill, compile time and tokenizer setup time.

    PYTHONPATH=. python bench/grammar_libs.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from keel.models.loader import open_checkpoint, resolve_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}


def allowed(mask: torch.Tensor, vocab: int) -> list[int]:
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


def walk(fill, accept, done, vocab, eos, steps, rng):
    words = (vocab + 31) // 32
    mask = torch.zeros(words, dtype=torch.int32)
    times, n = [], 0
    for _ in range(steps):
        t = time.perf_counter()
        fill(mask)
        times.append(time.perf_counter() - t)
        ok = [i for i in allowed(mask, vocab) if i not in eos]
        if not ok or done():
            break
        # prefer short tokens half the time so paths visit string bodies as well as structure
        accept(rng.choice(ok))
        n += 1
    return times, n


def bytelevel_vocab(tok) -> list[bytes]:
    # GPT-2 byte-level alphabet back to raw bytes
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, k = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    dec = {chr(c): b for b, c in zip(bs, cs)}
    out = []
    for i in range(tok.vocab_size):
        s = tok.id_to_token(i) or ""
        try:
            out.append(bytes(dec[ch] for ch in s))
        except KeyError:
            out.append(s.encode())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--walks", type=int, default=3)
    args = ap.parse_args()
    tok = open_checkpoint(resolve_model(None)).tokenizer
    V, eos = tok.vocab_size, set(tok.eos_token_ids)
    schema = json.dumps(SCHEMA)
    print(f"vocab {V}, torch threads {torch.get_num_threads()}")
    rows = []

    import xgrammar as xgr
    t = time.perf_counter()
    info = xgr.TokenizerInfo(bytelevel_vocab(tok), xgr.VocabType.RAW, vocab_size=V, stop_token_ids=list(eos))
    comp = xgr.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    cg = comp.compile_json_schema(schema, any_whitespace=False)
    compile_s = time.perf_counter() - t
    all_t, total = [], 0
    for w in range(args.walks):
        m = xgr.GrammarMatcher(cg)
        times, n = walk(lambda mk: m.fill_next_token_bitmask(mk.unsqueeze(0)), m.accept_token, m.is_terminated,
                        V, eos, args.steps, random.Random(w))
        all_t += times
        total += n
    rows.append(("xgrammar", setup, compile_s, all_t, total))

    import llguidance as llg
    t = time.perf_counter()
    lt = llg.LLTokenizer(tok._tok.to_str(), n_vocab=V, eos_token=list(eos))
    setup = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    m0 = llg.LLMatcher(lt, grammar)
    compile_s = time.perf_counter() - t
    assert not m0.is_error(), m0.get_error()
    all_t, total = [], 0
    for w in range(args.walks):
        m = llg.LLMatcher(lt, grammar)
        times, n = walk(lambda mk: m.unsafe_compute_mask_ptr(mk.data_ptr(), mk.numel() * 4), m.consume_token,
                        m.is_accepting, V, eos, args.steps, random.Random(w))
        all_t += times
        total += n
    rows.append(("llguidance", setup, compile_s, all_t, total))

    import outlines_core as oc
    t = time.perf_counter()
    vb = bytelevel_vocab(tok)
    eos_id = min(eos)
    mp: dict[bytes, list[int]] = {}
    for i, b in enumerate(vb):
        if i not in eos and b:
            mp.setdefault(b, []).append(i)
    voc = oc.Vocabulary(eos_id, mp)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    regex = oc.json_schema.build_regex_from_schema(schema)
    index = oc.Index(regex, voc)
    compile_s = time.perf_counter() - t
    all_t, total = [], 0
    for w in range(args.walks):
        g = oc.Guide(index)
        times, n = walk(lambda mk: g.write_mask_into(mk.data_ptr(), mk.numel(), 4), g.advance,
                        g.is_finished, V, eos, args.steps, random.Random(w))
        all_t += times
        total += n
    rows.append(("outlines-core", setup, compile_s, all_t, total))

    print(f"{'library':14} {'setup s':>8} {'compile s':>10} {'mask mean ms':>13} {'p50 ms':>8} {'p99 ms':>8} {'tokens':>7}")
    for name, setup, comp_s, ts, n in rows:
        ts = sorted(ts)
        print(f"{name:14} {setup:8.3f} {comp_s:10.3f} {1e3 * sum(ts) / len(ts):13.3f} "
              f"{1e3 * ts[len(ts) // 2]:8.3f} {1e3 * ts[int(len(ts) * 0.99)]:8.3f} {n:7d}")


if __name__ == "__main__":
    main()
