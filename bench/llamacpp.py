"""keel against llama.cpp on the same GGUF file, same threads, same run: batch-1 decode (`llama-bench` against
keel's offline API) and 1 / 32 concurrent streaming chat clients (`llama-server -np 32` against
`keel serve`), both through the official `openai` client.

    .venv/bin/python -m bench.llamacpp --llama-cpp PATH/TO/llama.cpp/build [--rounds 3] [--out bench/results/llamacpp.md]

llama.cpp is not a keel dependency: build it from source (see ../shared/ANCHORS.md: `pip download
--no-binary :all: --no-deps llama_cpp_python`, then in vendor/llama.cpp `cmake -B build -DGGML_NATIVE=ON
-DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON && cmake --build build -j2 --target llama-server llama-bench`).
Batch-1 decode rounds alternate llama.cpp and keel, each in its own process; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from bench.decode import machine
from bench.report import publish
from bench.serve import free_port, run_clients, wait_up

NEW = 64
KEEL_B1 = """
import json, time
from keel import LLM, SamplingParams
llm = LLM()
ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story about a lighthouse keeper."}])
llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
best = 0.0
for _ in range(3):
    t = time.perf_counter()
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=%d, ignore_eos=True))
    best = max(best, %d / (time.perf_counter() - t))
print(json.dumps(best))
""" % (NEW, NEW)


def llama_bench(build: str, gguf: str, threads: int) -> float:
    out = subprocess.run([os.path.join(build, "bin", "llama-bench"), "-m", gguf, "-t", str(threads), "-p", "0",
                          "-n", str(NEW), "-r", "3", "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def keel_b1() -> float:
    r = subprocess.run([sys.executable, "-c", KEEL_B1], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def served(cmd: list[str], port: int, health: str, counts: list[int]) -> dict:
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(port, health)
        base = f"http://127.0.0.1:{port}/v1"
        asyncio.run(run_clients(base, 2, 8))  # warm-up
        return {n: asyncio.run(run_clients(base, n, NEW)) for n in counts}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp's build folder (with bin/llama-bench, bin/llama-server)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from keel.models.loader import default_model_path
    gguf = default_model_path()
    b1 = {"llama.cpp": [], "keel": []}
    for r in range(args.rounds):
        b1["llama.cpp"].append(llama_bench(args.llama_cpp, gguf, args.threads))
        b1["keel"].append(keel_b1())
        print(r, {k: round(v[-1], 1) for k, v in b1.items()}, flush=True)
    counts = [1, 32]
    port = free_port()
    lc = served([os.path.join(args.llama_cpp, "bin", "llama-server"), "-m", gguf, "-np", "32", "-c", "8192",
                 "-t", str(args.threads), "-cb", "--port", str(port)], port, "/health", counts)
    port = free_port()
    keel = os.path.join(os.path.dirname(sys.executable), "keel")
    kl = served([keel, "serve", "--port", str(port), "--max-num-seqs", "64", "--quiet"], port, "/health", counts)
    med = {k: statistics.median(v) for k, v in b1.items()}
    lines = [f"# keel against llama.cpp ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine()}; the built-in GGUF ({os.path.basename(gguf)}), {args.threads} threads, greedy, "
             f"{NEW} new tokens; llama.cpp built from source (llama-cpp-python 0.3.36's vendored tree, "
             "`GGML_NATIVE=ON`).", "",
             "| | llama.cpp | keel default | keel / llama.cpp |", "|---|---|---|---|",
             f"| batch-1 decode tok/s (median of {args.rounds} interleaved rounds; llama-bench tg{NEW} vs LLM.generate) "
             f"| {med['llama.cpp']:.1f} | {med['keel']:.1f} | {med['keel'] / med['llama.cpp']:.2f}x |"]
    for n in counts:
        a, b = lc[n], kl[n]
        lines.append(f"| {n} streaming chat client{'s' if n > 1 else ''}, tok/s (llama-server -np 32 vs keel serve) "
                     f"| {a['tps']:.1f} | {b['tps']:.1f} | {b['tps'] / a['tps']:.2f}x |")
    lines += ["", "Rounds, batch-1 tok/s: " + "; ".join(f"{k} " + " / ".join(f"{x:.1f}" for x in v) for k, v in b1.items())]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
