"""The LoRA training loop: keel's model with trainable LoRA pairs, the loss on assistant tokens only,
AdamW with linear warmup and linear decay, gradient accumulation, optional gradient checkpointing,
checkpoints every N steps and resumption from the last one.

Deterministic for a seed on one machine: the example order of epoch e is a permutation drawn from
(seed, e), dropout masks from (seed, step), the LoRA initialisation from the seed, and a checkpoint
holds everything else (adapter, optimizer moments, step), so a job resumed from a checkpoint continues
with the same numbers an uninterrupted one computes.

Why it is quicker than a Trainer over a transformers model (bench/finetune.py): the examples of a
micro-batch are packed, not padded (each attends within itself), q/k/v and gate/up are one matmul each,
each adapted projection runs as one op with its update merged into the weight (keel.finetune.lora.
MergedLoRALinear), and the output head runs only on the positions whose next token is learned.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from keel.errors import KeelError
from keel.finetune.data import Example
from keel.finetune.lora import TRAINING, TrainableLoRA, attach, save_peft
from keel.finetune.settings import TrainSettings
from keel.layers.attention import CausalBatch

STATE_FILE = "trainer_state.pt"


@dataclass
class StepMetrics:
    step: int  # 1-based optimizer step
    total_steps: int
    epoch: int
    train_loss: float  # mean over the step's learned tokens
    train_mean_token_accuracy: float
    tokens: int  # all tokens of the step's examples
    lr: float


def load_base(model_path: str, max_len: int, device: torch.device, dtype: torch.dtype):
    """keel's model (plain PyTorch operators: keel's CPU kernels compute no gradients) and tokenizer."""
    from keel.layers.norm import RMSNorm
    from keel.models.llama import MLP
    from keel.models.loader import build_model, open_checkpoint
    ckpt = open_checkpoint(model_path)
    if ckpt.quantization is not None:
        raise KeelError(f"{ckpt.name} is a quantized checkpoint ({ckpt.quantization.describe()}); training LoRA "
                        f"on it is not supported yet: fine-tune the original checkpoint")
    limit = min(max_len, ckpt.config.max_position_embeddings)
    # A GGUF file's quantized blocks are widened to the dtype: the adapter learns on the same values the
    # server's block kernels compute with.
    model = build_model(ckpt, dtype, device, limit)
    for m in model.modules():
        if isinstance(m, (RMSNorm, MLP)):
            m.own = False
    return model, ckpt


def hidden_states(model, ids: torch.Tensor, lengths: list[int], checkpointing: bool = False) -> torch.Tensor:
    """ids: [sum(lengths)], the sequences packed one after another -> final hidden states [T, hidden],
    through keel's layers with LoRA in training mode."""
    meta = CausalBatch(list(lengths))
    positions = torch.cat([torch.arange(n, device=ids.device) for n in lengths])
    x, ropes = model.layer_inputs(ids, positions)
    for layer, rope in zip(model.model.layers, ropes):
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(layer, x, rope, meta, TRAINING, use_reentrant=False)
        else:
            x = layer(x, rope, meta, TRAINING)
    return model.model.norm(x)


def _micro_batches(batch: list[Example], budget: int) -> list[list[Example]]:
    """Consecutive examples grouped so that each group holds at most `budget` tokens (one longer
    example goes alone)."""
    groups, cur, size = [], [], 0
    for ex in batch:
        n = len(ex.ids)
        if cur and size + n > budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(ex)
        size += n
    if cur:
        groups.append(cur)
    return groups


def _packed(group: list[Example], device) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """(ids packed [T], lengths, rows of the hidden states that predict a learned token, those tokens).
    Packed, not padded: a padding row costs every projection as much as a real one
    (bench/results/finetune.md)."""
    ids, lengths, rows, targets, start = [], [], [], [], 0
    for ex in group:
        ids += ex.ids
        lengths.append(len(ex.ids))
        for t, learned in enumerate(ex.labels):
            if learned:
                rows.append(start + t - 1)  # the hidden state before token t predicts it
                targets.append(ex.ids[t])
        start += len(ex.ids)
    return (torch.tensor(ids, device=device), lengths, torch.tensor(rows, device=device),
            torch.tensor(targets, device=device))


def activation_bytes(model, tokens: int) -> int:
    """What a forward pass over `tokens` tokens keeps for the backward pass, about: per token and layer
    16 hidden-wide and 6 intermediate-wide float vectors (norms, projections, rotary, attention and MLP
    outputs), which matches the peak memory bench/finetune.py measures on SmolLM2."""
    cfg = model.config
    per = 16 * cfg.hidden_size + 6 * cfg.intermediate_size
    return tokens * cfg.num_layers * per * torch.finfo(model.dtype).bits // 8


def wants_checkpointing(model, tokens: int, device: torch.device) -> bool:
    """Gradient checkpointing when a micro-batch's activations would take over half the free memory."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        from keel.engine.memory import available_cpu_bytes
        free = available_cpu_bytes()
    return free is not None and activation_bytes(model, tokens) > free // 2


class Trainer:
    def __init__(self, model, layers: list[TrainableLoRA], settings: TrainSettings, seed: int,
                 train: list[Example], valid: list[Example] | None = None) -> None:
        self.model, self.layers, self.s, self.seed = model, layers, settings, seed
        self.train, self.valid = train, valid or []
        self.params = [p for layer in layers for p in layer.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        self.steps_per_epoch = -(-len(train) // settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.n_epochs
        self.warmup = max(1, round(settings.warmup_ratio * self.total_steps)) if settings.warmup_ratio else 0
        self.step = 0  # optimizer steps done
        self.device = next(model.parameters()).device
        if settings.gradient_checkpointing is None:
            longest = max([len(ex.ids) for ex in train] + [1])
            biggest = max(longest, min(settings.micro_batch_tokens, settings.batch_size * longest))
            settings.gradient_checkpointing = wants_checkpointing(model, biggest, self.device)

    @classmethod
    def build(cls, model_path: str, settings: TrainSettings, seed: int, train: list[Example],
              valid: list[Example] | None = None, device: str | torch.device = "cpu", dtype=torch.float32) -> "Trainer":
        model, _ = load_base(model_path, settings.max_seq_length, torch.device(device), dtype)
        layers = attach(model, settings.r, settings.alpha, settings.dropout, settings.target_modules, seed)
        return cls(model, layers, settings, seed, train, valid)

    # -- schedule ----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then linear decay to zero."""
        base = self.s.learning_rate
        if step < self.warmup:
            return base * (step + 1) / self.warmup
        return base * max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup))

    def batch_of(self, step: int) -> tuple[int, list[Example]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        picks = order[i * self.s.batch_size:(i + 1) * self.s.batch_size].tolist()
        return epoch, [self.train[j] for j in picks]

    # -- one step ----------------------------------------------------------------------------
    def _loss(self, group: list[Example]) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy over the group's learned tokens, correct greedy predictions)."""
        ids, lengths, rows, targets = _packed(group, self.device)
        h = hidden_states(self.model, ids, lengths, self.s.gradient_checkpointing)
        logits = self.model.compute_logits(h.index_select(0, rows))  # the head only where a token is learned
        loss = F.cross_entropy(logits, targets, reduction="sum")
        return loss, int((logits.argmax(-1) == targets).sum())

    def train_step(self) -> StepMetrics:
        epoch, batch = self.batch_of(self.step)
        self.model.train()
        torch.manual_seed(self.seed * 1_000_003 + self.step)  # dropout masks, the same on a resumed run
        learned = sum(ex.trained_tokens for ex in batch)
        total_loss, correct = 0.0, 0
        self.opt.zero_grad(set_to_none=True)
        for group in _micro_batches(batch, self.s.micro_batch_tokens):
            loss, ok = self._loss(group)
            (loss / learned).backward()  # accumulated: the step's mean over its learned tokens
            total_loss += float(loss.detach())
            correct += ok
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.step += 1
        return StepMetrics(self.step, self.total_steps, epoch + 1, total_loss / learned, correct / learned,
                           sum(len(ex.ids) for ex in batch), lr)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if not self.valid:
            return None
        self.model.eval()
        total, n = 0.0, 0
        for group in _micro_batches(self.valid, self.s.micro_batch_tokens):
            loss, _ = self._loss(group)
            total += float(loss)
            n += sum(ex.trained_tokens for ex in group)
        return total / n

    # -- checkpoints ---------------------------------------------------------------------------
    def save_adapter(self, folder: str, base_model: str) -> None:
        s = self.s
        save_peft(self.layers, folder, s.r, s.alpha, s.dropout, s.target_modules, base_model)

    def save_checkpoint(self, folder: str, base_model: str, metrics: dict) -> None:
        """The adapter (servable as is) plus what resuming needs, written beside and renamed into place."""
        tmp = folder + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_adapter(tmp, base_model)
        torch.save({"step": self.step, "optimizer": self.opt.state_dict()}, os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    def resume(self, folder: str) -> None:
        from safetensors.torch import load_file
        from keel.lora.adapter import WEIGHTS_FILE
        tensors = load_file(os.path.join(folder, WEIGHTS_FILE))
        with torch.no_grad():
            for layer in self.layers:
                for k, i in enumerate(layer.order):
                    name = layer.names[i]
                    layer.A[k].copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
                    layer.B[k].copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
        state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location=self.device)
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def checkpoint_due(self) -> bool:
        every = self.s.checkpoint_interval or self.steps_per_epoch
        return self.step % every == 0 and self.step < self.total_steps


def latest_checkpoint(folder: str) -> str | None:
    """The checkpoint folder of the highest step under `folder` (step-N), complete ones only."""
    if not os.path.isdir(folder):
        return None
    steps = [int(n[5:]) for n in os.listdir(folder) if n.startswith("step-") and n[5:].isdigit()
             and os.path.isfile(os.path.join(folder, n, STATE_FILE))]
    return os.path.join(folder, f"step-{max(steps)}") if steps else None


def run(trainer: Trainer, checkpoints: str, base_model: str, on_step: Callable[[StepMetrics], None] = lambda m: None,
        on_checkpoint: Callable[[str, dict], None] = lambda p, m: None,
        should_stop: Callable[[], bool] = lambda: False) -> dict | None:
    """Train to the end (from the latest checkpoint under `checkpoints` if there is one). Returns the
    final metrics, or None when should_stop() asked to stop between steps."""
    last = latest_checkpoint(checkpoints)
    if last is not None:
        trainer.resume(last)
    metrics: dict = {}
    started = time.monotonic()
    while trainer.step < trainer.total_steps:
        if should_stop():
            return None
        m = trainer.train_step()
        on_step(m)
        metrics = {"step": m.step, "train_loss": m.train_loss, "train_mean_token_accuracy": m.train_mean_token_accuracy}
        if trainer.checkpoint_due():
            valid = trainer.validation_loss()
            if valid is not None:
                metrics["valid_loss"] = valid
            path = os.path.join(checkpoints, f"step-{trainer.step}")
            trainer.save_checkpoint(path, base_model, metrics)
            on_checkpoint(path, metrics)
    valid = trainer.validation_loss()
    if valid is not None:
        metrics["full_valid_loss"] = valid
    metrics["seconds"] = time.monotonic() - started
    return metrics
