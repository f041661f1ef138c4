"""LoRA training speed and memory: keel's trainer against PEFT + transformers' Trainer, same run, same
machine, and how much serving slows while a job trains.

    .venv/bin/python -m bench.finetune [--steps 12] [--rounds 2] [--out bench/results/finetune.md]

Both sides train the built-in model (SmolLM2-135M-Instruct; transformers reads the same GGUF file and
widens its blocks to float32, as keel does) with LoRA r=16, alpha=32 on all seven projections, batch 8,
the same examples in the same order, loss on the assistant tokens only (the same token masks: keel's
tokenization), AdamW, lr 2e-4 decaying linearly to 0 (no warmup: the two libraries define a warmup step
differently, with no warmup their schedules are the same). Each side runs in its own process
(peak RSS = its memory), sides interleaved round by round; tokens/s counts every token of every
example (prompt and answer), after the first step (warm-up). Loss curves of both are plotted in
finetune_loss.svg. Serving: 8 concurrent greedy requests of 64 tokens on the engine, alone and while a
training process (1 thread, at the job worker's lowered priority) runs beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

R, ALPHA, BATCH = 16, 32, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FILLER = ("The archive keeps a record of every ship that entered the harbour, its cargo, its crew and the "
          "weather on the day it arrived. ")


def examples(n: int) -> list[dict]:
    """Chat examples of ~100-250 tokens: a question and a long answer."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.finetune.facts import TRAIN
    out = []
    for i in range(n):
        ex = json.loads(json.dumps(TRAIN[i % len(TRAIN)]))
        ex["messages"][-1]["content"] += " " + FILLER * (1 + i % 4)
        out.append(ex)
    return out


def tokenized(n: int, max_len: int = 512):
    from keel.finetune.data import check_example, tokenize
    from keel.models.loader import default_model_path, open_checkpoint
    tok = open_checkpoint(default_model_path()).tokenizer
    return [tokenize(check_example(r, i + 1), tok, max_len, i + 1) for i, r in enumerate(examples(n))]


def run_keel(steps: int) -> dict:
    from keel.finetune.settings import resolve
    from keel.finetune.trainer import Trainer
    from keel.models.loader import default_model_path
    data = tokenized(steps * BATCH)
    s = resolve({"n_epochs": 1, "batch_size": BATCH, "warmup_ratio": 0}, {"r": R, "alpha": ALPHA, "target_modules": TARGETS},
                len(data), 2048)
    trainer = Trainer.build(default_model_path(), s, 0, data)
    trainer.batch_of = lambda step: (0, data[step * BATCH:(step + 1) * BATCH])  # the same order as PEFT's
    losses, t0, tokens = [], None, 0
    for step in range(steps):
        m = trainer.train_step()
        losses.append(m.train_loss)
        if step == 0:
            t0 = time.perf_counter()
        else:
            tokens += m.tokens
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "losses": losses}


def run_peft(steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from keel.models.loader import default_model_path
    data = tokenized(steps * BATCH)
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    # transformers widened the GGUF blocks to float32 tensors, as keel does; only its "quantized" mark stays,
    # and its Trainer refuses to train a model so marked
    model.hf_quantizer, model.is_quantized = None, False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    rows = [{"input_ids": ex.ids, "labels": [t if lab else -100 for t, lab in zip(ex.ids, ex.labels)]} for ex in data]

    def collate(batch):
        L = max(len(b["input_ids"]) for b in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        labels = torch.full((len(batch), L), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class Clock(TrainerCallback):
        t0 = None
        losses: list = []

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                Clock.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                Clock.losses.append(logs["loss"])

    out = tempfile.mkdtemp()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=2e-4,
                             warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)  # keel's order
    trainer.train()
    tokens = sum(len(ex.ids) for ex in data[BATCH:steps * BATCH])
    return {"tokens_per_s": tokens / (time.perf_counter() - Clock.t0), "losses": Clock.losses}


def serving(train_too: bool, data_dir: str) -> dict:
    """Greedy decode tok/s of 8 concurrent requests, alone or while a keel training worker runs."""
    import torch

    from keel import LLM, SamplingParams
    llm = LLM()
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": f"Tell me story number {i}."}]) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))
    worker = None
    if train_too:
        worker = subprocess.Popen([sys.executable, "-m", "bench.finetune", "--side", "keel", "--steps", "40",
                                   "--threads", "1", "--nice", "--json", os.path.join(data_dir, "bg.json")])
        time.sleep(15)  # past model loading, into training
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    if worker is not None:
        worker.kill()
    return {"tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / dt, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["keel", "peft", "serve", "serve+train"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--nice", action="store_true", help="at the training worker's priority")
    ap.add_argument("--json")
    ap.add_argument("--out", default="bench/results/finetune.md")
    args = ap.parse_args()
    if args.side:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.nice:
            from keel.finetune.worker import lower_priority
            lower_priority()
        tmp = tempfile.mkdtemp()
        fn = {"keel": lambda: run_keel(args.steps), "peft": lambda: run_peft(args.steps),
              "serve": lambda: serving(False, tmp), "serve+train": lambda: serving(True, tmp)}[args.side]
        result = fn()
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(args.json, "w") as f:
            json.dump(result, f)
        return
    from bench.decode import machine
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for side in ("keel", "peft", "serve", "serve+train"):
            out = tempfile.mktemp(suffix=".json")
            subprocess.run([sys.executable, "-m", "bench.finetune", "--side", side, "--steps", str(args.steps),
                            "--json", out], check=True)
            with open(out) as f:
                results.setdefault(side, []).append(json.load(f))
            print(rnd, side, {k: v for k, v in results[side][-1].items() if k != "losses"}, flush=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in ("losses",)} for s, rs in results.items()}
    keel, peft = med["keel"], med["peft"]
    lk, lp = results["keel"][-1]["losses"], results["peft"][-1]["losses"]
    lines = [f"# LoRA fine-tuning: keel vs PEFT + transformers Trainer ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine()}. Built-in SmolLM2-135M-Instruct (float32), LoRA r={R} alpha={ALPHA} on all seven "
             f"projections, batch {BATCH}, {args.steps} steps (first one not timed), medians of {args.rounds} "
             f"interleaved rounds, each side in its own process.", "",
             "| | tokens/s | peak RSS (MB) |", "|---|---|---|",
             f"| keel | {keel['tokens_per_s']:.0f} | {keel['peak_rss_mb']:.0f} |",
             f"| PEFT + Trainer | {peft['tokens_per_s']:.0f} | {peft['peak_rss_mb']:.0f} |",
             f"| **ratio keel/PEFT** | **{keel['tokens_per_s'] / peft['tokens_per_s']:.2f}x** | "
             f"**{keel['peak_rss_mb'] / peft['peak_rss_mb']:.2f}x** |", "",
             "Loss per step (last round; the same data, order, masks and schedule):", "",
             "| step | " + " | ".join(str(i + 1) for i in range(len(lk))) + " |",
             "|---|" + "---|" * len(lk),
             "| keel | " + " | ".join(f"{v:.3f}" for v in lk) + " |",
             "| PEFT | " + " | ".join(f"{v:.3f}" for v in lp) + " |", "",
             f"Serving while a job trains (8 concurrent greedy requests, 64 tokens; the worker on 1 thread): "
             f"{med['serve']['tok_s']:.1f} tok/s alone, {med['serve+train']['tok_s']:.1f} tok/s with training beside "
             f"it = **{med['serve+train']['tok_s'] / med['serve']['tok_s']:.2f}x**.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    from keel.finetune.plot import loss_svg
    with open(os.path.join(os.path.dirname(args.out), "finetune_loss.svg"), "w") as f:
        f.write(loss_svg({"keel": list(enumerate(lk, 1)), "PEFT + Trainer": list(enumerate(lp, 1))},
                         "LoRA training loss, SmolLM2-135M, r=16"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
