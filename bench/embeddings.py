"""Embeddings: keel's EmbeddingModel against transformers with the same pooling, on the built-in
all-MiniLM-L6-v2, texts per second at batch 1 and 32, in one run.

    .venv/bin/python -m bench.embeddings [--out bench/results/embeddings.md] [--texts 256] [--rounds 3]

Texts: runs of 1-6 consecutive sentences of bench/data/quant_text.txt (so lengths vary as in a real
document collection, about 10-200 tokens). Both sides go from text to normalised vectors: tokenize,
pad (transformers pads each batch to its longest text; keel sorts each batch by length and packs what
fits), encode, mean-pool, normalise. Rounds alternate between the two, best round kept. The vectors of
both are compared (cosine) so that a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time

import torch

from bench.decode import machine
from keel.embed import EmbeddingModel, builtin_embedding_path

TEXT = os.path.join(os.path.dirname(__file__), "data", "quant_text.txt")


def texts(n: int) -> list[str]:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", open(TEXT).read()) if s.strip()]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        start, k = rng.randrange(len(sentences)), rng.randint(1, 6)
        out.append(" ".join(sentences[start:start + k]))
    return out


class HFEmbedder:
    def __init__(self, path: str) -> None:
        from transformers import AutoModel, AutoTokenizer
        self.model = AutoModel.from_pretrained(path).eval()
        self.tok = AutoTokenizer.from_pretrained(path)

    @torch.inference_mode()
    def __call__(self, batch: list[str]) -> torch.Tensor:
        enc = self.tok(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = self.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def keel_embedder(model: EmbeddingModel):
    def run(batch: list[str]) -> torch.Tensor:
        return model.embed([model.encode(t)[:model.max_len] for t in batch])
    return run


def timed(fn, data: list[str], batch: int) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    outs = [fn(data[i:i + batch]) for i in range(0, len(data), batch)]
    return len(data) / (time.perf_counter() - t), torch.cat(outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    data = texts(args.texts)
    keel = EmbeddingModel()
    lengths = [len(keel.encode(t)) for t in data]
    runners = {"keel": keel_embedder(keel), "transformers": HFEmbedder(builtin_embedding_path())}
    best = {(name, b): 0.0 for name in runners for b in (1, 32)}
    vectors = {}
    for name, fn in runners.items():  # warm-up
        fn(data[:32])
    for r in range(args.rounds):
        for b in (1, 32):
            for name, fn in runners.items():
                tps, vec = timed(fn, data if b > 1 else data[:64], b)
                best[name, b] = max(best[name, b], tps)
                vectors[name] = vec if b > 1 else vectors.get(name)
        print(f"round {r + 1}:", {f"{k[0]} b={k[1]}": round(v, 1) for k, v in best.items()}, flush=True)
    cos = torch.nn.functional.cosine_similarity(vectors["keel"], vectors["transformers"], dim=-1).min().item()
    rows = [f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}",
            f"Built-in all-MiniLM-L6-v2, float32. {len(data)} texts of {min(lengths)}-{max(lengths)} tokens "
            f"(mean {sum(lengths) / len(lengths):.0f}); batch 1 over the first 64 texts. Best of {args.rounds} "
            f"interleaved rounds. Lowest cosine between keel's and transformers' vectors: {cos:.6f}.", "",
            "| batch | keel texts/s | transformers texts/s | keel / transformers |", "|---|---|---|---|"]
    for b in (1, 32):
        k, h = best["keel", b], best["transformers", b]
        rows.append(f"| {b} | {k:.1f} | {h:.1f} | {k / h:.2f}x |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# bench/embeddings.py\n\n" + text + "\n")


if __name__ == "__main__":
    main()
