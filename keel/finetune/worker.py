"""The training worker: one process per job run, started by the server's job runner (keel.finetune.jobs).

    python -m keel.finetune.worker JOB_ID --database-url URL --data-dir DIR [--threads N]

It reads the job and its files, trains (resuming from the job's last checkpoint if it has one), writes
events, checkpoints and the final adapter, and records the outcome in the database. It never touches
the serving engine: serving runs on in the server process while it trains. It stops when the job is
cancelled or when the server that started it is gone (the job then resumes when a server restarts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from keel.errors import KeelError
from keel.store.db import Database, loads
from keel.store.jobs import JobStore

RESULT_FILE = "result.json"  # written last, beside the final adapter


def job_folder(data_dir: str, job_id: str) -> str:
    return os.path.join(data_dir, "fine_tuning", job_id)


def train_job(store: JobStore, job_id: str, data_dir: str, device: str = "cpu") -> None:
    from keel.finetune.settings import TrainSettings
    from keel.finetune.data import read_examples
    from keel.finetune.lora import attach
    from keel.finetune.trainer import Trainer, latest_checkpoint, load_base, run
    job = store.get(job_id)
    settings = TrainSettings.from_dict(loads(job["settings"]))
    folder = job_folder(data_dir, job_id)
    if os.path.exists(os.path.join(folder, RESULT_FILE)):
        return  # trained already; the server had not yet recorded it
    ckpt_dir = os.path.join(folder, "checkpoints")
    model, ckpt = load_base(job["model_path"], settings.max_seq_length, torch.device(device),
                            torch.float32 if device == "cpu" else torch.bfloat16)
    train = read_examples(os.path.join(folder, "training.jsonl"), ckpt.tokenizer, settings.max_seq_length)
    valid_path = os.path.join(folder, "validation.jsonl")
    valid = read_examples(valid_path, ckpt.tokenizer, settings.max_seq_length) if os.path.exists(valid_path) else None
    layers = attach(model, settings.r, settings.alpha, settings.dropout, settings.target_modules, job["seed"])
    trainer = Trainer(model, layers, settings, job["seed"], train, valid)
    resumed = latest_checkpoint(ckpt_dir)
    if not store.update(job_id, only_if_status=("queued", "running"), status="running"):
        return  # cancelled meanwhile
    store.event(job_id, f"Fine-tuning job resumed from its checkpoint at step {os.path.basename(resumed)[5:]}"
                if resumed else f"Fine-tuning job started: {trainer.total_steps} steps over {len(train)} examples")
    parent = os.getppid()
    started, first_step = time.time(), None

    def on_step(m) -> None:
        nonlocal first_step
        first_step = m.step if first_step is None else first_step
        data = {"step": m.step, "total_steps": m.total_steps, "train_loss": m.train_loss,
                "train_mean_token_accuracy": m.train_mean_token_accuracy, "learning_rate": m.lr}
        store.event(job_id, f"Step {m.step}/{m.total_steps}: training loss={m.train_loss:.4f}", type="metrics", data=data)
        per_step = (time.time() - started) / (m.step - first_step + 1)
        store.update(job_id, estimated_finish=int(time.time() + per_step * (m.total_steps - m.step)))

    def on_checkpoint(path: str, metrics: dict) -> None:
        store.add_checkpoint(job_id, metrics["step"], metrics, path)
        store.event(job_id, f"Checkpoint created at step {metrics['step']}")

    def should_stop() -> bool:
        if os.getppid() != parent:  # the server is gone: stop; a restarted server resumes the job
            sys.exit(3)
        return bool(store.get(job_id)["cancel_requested"])

    metrics = run(trainer, ckpt_dir, job["model"], on_step, on_checkpoint, should_stop)
    if metrics is None:
        return  # cancelled: the API has recorded it
    trainer.save_adapter(os.path.join(folder, "adapter"), job["model"])
    # The server serves the adapter, then records the job as succeeded (so a client that sees
    # `succeeded` can use the model at once); this file tells it, and a rerun, that training is done.
    result = {"trained_tokens": settings.n_epochs * sum(len(ex.ids) for ex in train), "metrics": metrics}
    with open(os.path.join(folder, RESULT_FILE + ".part"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(folder, RESULT_FILE + ".part"), os.path.join(folder, RESULT_FILE))


NICENESS = 10


def lower_priority() -> None:
    """Let serving win the CPU: a training step can wait, a user's tokens should not. Without it a worker
    beside the engine on a small machine takes about half of it (bench/results/finetune.md)."""
    try:
        os.nice(NICENESS)
    except (OSError, AttributeError):  # not permitted, or not a POSIX system
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m keel.finetune.worker")
    p.add_argument("job_id")
    p.add_argument("--database-url", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    lower_priority()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = JobStore(Database(args.database_url))
    try:
        train_job(store, args.job_id, args.data_dir, args.device)
    except KeelError as e:
        store.finish(args.job_id, "failed", f"The job failed: {e}", level="error",
                     error={"code": "invalid_training_file", "message": str(e), "param": "training_file"})
        return 1
    except Exception as e:  # anything else is a bug or a machine problem; the job says which
        store.finish(args.job_id, "failed", f"The job failed: {type(e).__name__}: {e}", level="error",
                     error={"code": "training_error", "message": f"{type(e).__name__}: {e}", "param": None})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
