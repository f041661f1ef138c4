"""`keel finetune DATA.jsonl --model M`: what a fine-tuning job does, offline, with a progress bar.

Writes the PEFT adapter into --output (default ./adapters/<model>-<data file name>), its checkpoints
under <output>/checkpoints (a rerun with the same output resumes from the last one), and loss.svg and
metrics.json beside the adapter. Serve it with `keel serve M --lora NAME=OUTPUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_finetune_parser(sub, model_args=None) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="train a LoRA adapter on a chat-format JSONL file",
                       usage="keel finetune DATA.jsonl [--model M] [options]")
    p.add_argument("data", metavar="DATA.jsonl", help="training examples, one {\"messages\": [...]} per line")
    p.add_argument("--model", "-m", default=None,
                   help="base model folder, GGUF file or hub id (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--validation", default=None, metavar="FILE", help="validation examples (same format)")
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="where the adapter goes")
    p.add_argument("--epochs", default="auto", help="n_epochs (1-50 or auto)")
    p.add_argument("--batch-size", default="auto", help="examples per optimizer step (1-256 or auto)")
    p.add_argument("--learning-rate-multiplier", "--lr-multiplier", default="auto",
                   help="times keel's base LoRA learning rate 2e-4 (or auto: 1)")
    p.add_argument("--rank", "-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--target-modules", default="all-linear",
                   help="comma-separated projections (q_proj,v_proj,...) or all-linear")
    p.add_argument("--max-seq-length", type=int, default=None, help="longer examples are cut (default: 2048)")
    p.add_argument("--checkpoint-interval", type=int, default=None, help="steps between checkpoints (default: each epoch)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass: less memory, slower (default: where a "
                        "micro-batch's activations would take over half the free memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.set_defaults(func=cmd_finetune)
    return p


def _auto_or(value: str, kind):
    return "auto" if value == "auto" else kind(value)


def cmd_finetune(args) -> int:
    import torch

    from keel.finetune.data import examples, parse_jsonl
    from keel.finetune.lora import attach
    from keel.finetune.plot import loss_svg
    from keel.finetune.settings import resolve
    from keel.finetune.trainer import Trainer, load_base, run
    from keel.models.loader import DEFAULT_MODEL_NAME, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    hyper = {"n_epochs": _auto_or(args.epochs, int), "batch_size": _auto_or(args.batch_size, int),
             "learning_rate_multiplier": _auto_or(args.learning_rate_multiplier, float)}
    if args.max_seq_length:
        hyper["max_seq_length"] = args.max_seq_length
    if args.checkpoint_interval:
        hyper["checkpoint_interval"] = args.checkpoint_interval
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    lora = {"r": args.rank, "alpha": args.alpha, "dropout": args.dropout, "target_modules": targets}
    lora = {k: v for k, v in lora.items() if v is not None}

    def read(file: str):
        try:
            with open(file, "rb") as f:
                return parse_jsonl(f.read(), "fine-tune")
        except OSError as e:
            from keel.errors import KeelError
            raise KeelError(f"cannot read {file}: {e.strerror}") from None

    records = read(args.data)
    valid_records = read(args.validation) if args.validation else []
    device = torch.device(args.device)
    model, ckpt = load_base(path, 1 << 30, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    settings = resolve(hyper, lora, len(records), model.max_positions)
    settings.gradient_checkpointing = args.gradient_checkpointing
    train = examples(records, ckpt.tokenizer, settings.max_seq_length)
    valid = examples(valid_records, ckpt.tokenizer, settings.max_seq_length)
    name = DEFAULT_MODEL_NAME if args.model is None else ckpt.name
    out = args.output or os.path.join("adapters", f"{name}-{os.path.splitext(os.path.basename(args.data))[0]}")
    layers = attach(model, settings.r, settings.alpha, settings.dropout, settings.target_modules, args.seed)
    trainer = Trainer(model, layers, settings, args.seed, train, valid)
    print(f"keel: fine-tuning {name} on {len(train)} examples ({sum(e.trained_tokens for e in train)} learned tokens): "
          f"{settings.n_epochs} epochs x {trainer.steps_per_epoch} steps, batch {settings.batch_size}, "
          f"lr {settings.learning_rate:g}, LoRA r={settings.r} alpha={settings.alpha:g} on "
          f"{','.join(settings.target_modules)}", file=sys.stderr)
    losses: list[tuple[int, float]] = []
    bar = _bar(trainer.total_steps)

    def on_step(m) -> None:
        losses.append((m.step, m.train_loss))
        if bar is not None:
            bar.n = m.step
            bar.set_postfix(loss=f"{m.train_loss:.4f}", refresh=True)
        elif m.step % 10 == 0 or m.step == m.total_steps:
            print(f"step {m.step}/{m.total_steps}: loss {m.train_loss:.4f}", file=sys.stderr)
    metrics = run(trainer, os.path.join(out, "checkpoints"), name, on_step)
    if bar is not None:
        bar.close()
    trainer.save_adapter(out, name)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({**metrics, "losses": losses}, f, indent=1)
    with open(os.path.join(out, "loss.svg"), "w") as f:
        f.write(loss_svg({"training loss": losses}, f"keel finetune: {name}, {os.path.basename(args.data)}"))
    print(f"keel: adapter written to {out} (final loss {metrics.get('train_loss', float('nan')):.4f}); serve it "
          f"with: keel serve {args.model or ''} --lora {os.path.basename(out.rstrip('/'))}={out}".replace("  ", " "),
          file=sys.stderr)
    return 0


def _bar(total: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="training", unit="step")
