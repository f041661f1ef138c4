"""A fine-tuning job's settings: OpenAI's supervised hyperparameters ("auto" or a value) and keel's LoRA
extension, checked and resolved to numbers once, when the job is created, and stored with it.

OpenAI's API: `method.supervised.hyperparameters` = {n_epochs 1-50, batch_size 1-256,
learning_rate_multiplier > 0}, each "auto" by default. keel's extension, a top-level `lora` object:
{r, alpha, dropout, target_modules}, and three more hyperparameters: max_seq_length, checkpoint_interval
(steps between checkpoints) and warmup_ratio. The learning rate is BASE_LEARNING_RATE times the
multiplier: a usual LoRA learning rate, not a full fine-tune's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from keel.errors import InvalidRequestError
from keel.finetune.lora import DEFAULT_TARGETS

BASE_LEARNING_RATE = 2e-4
MAX_RANK = 256


@dataclass
class TrainSettings:
    n_epochs: int
    batch_size: int  # examples per optimizer step
    learning_rate_multiplier: float
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    max_seq_length: int = 2048  # longer examples are cut
    checkpoint_interval: int = 0  # steps between checkpoints (0: one per epoch)
    warmup_ratio: float = 0.03
    micro_batch_tokens: int = 4096  # tokens per forward pass; a step accumulates gradients over several
    gradient_checkpointing: bool | None = None  # recompute each layer's activations in the backward pass
    # (None: where a micro-batch's activations would not fit in memory, see keel.finetune.trainer)

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        return cls(**d)

    def hyperparameters(self) -> dict:
        """The job object's `hyperparameters` (and method.supervised.hyperparameters)."""
        return {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
                "learning_rate_multiplier": self.learning_rate_multiplier}


def _int(value, name: str, lo: int, hi: int, auto: int) -> int:
    if value is None or value == "auto":
        return auto
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be \"auto\" or an integer from {lo} to {hi}, not {value!r}", param=name)
    return value


def _float(value, name: str, lo: float, hi: float, auto: float, lo_open: bool = False) -> float:
    if value is None or value == "auto":
        return auto
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > hi or value < lo or (lo_open and value == lo):
        bound = f"over {lo}" if lo_open else f"from {lo}"
        raise InvalidRequestError(f"{name} must be \"auto\" or a number {bound} up to {hi}, not {value!r}", param=name)
    return float(value)


HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier", "max_seq_length", "checkpoint_interval",
                   "warmup_ratio")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def resolve(hyper: dict | None, lora: dict | None, num_examples: int, model_max_len: int) -> TrainSettings:
    """Settings for a job over num_examples training examples; InvalidRequestError naming the field.

    "auto": batch_size ~0.2% of the examples (1 to 16), as OpenAI sizes it; n_epochs 3, more for small
    files so that a job makes at least ~100 optimizer steps (at most 10 epochs)."""
    hyper = dict(hyper or {})
    lora = dict(lora or {})
    unknown = set(hyper) - set(HYPERPARAMETERS)
    if unknown:
        raise InvalidRequestError(f"unknown hyperparameter(s) {sorted(unknown)}; supported: {', '.join(HYPERPARAMETERS)}",
                                  param="method.supervised.hyperparameters")
    unknown = set(lora) - set(LORA_KEYS)
    if unknown:
        raise InvalidRequestError(f"unknown lora setting(s) {sorted(unknown)}; supported: {', '.join(LORA_KEYS)}",
                                  param="lora")
    p = "method.supervised.hyperparameters."
    batch = _int(hyper.get("batch_size"), p + "batch_size", 1, 256, max(1, min(16, round(0.002 * num_examples))))
    steps_per_epoch = -(-num_examples // batch)
    epochs = _int(hyper.get("n_epochs"), p + "n_epochs", 1, 50, max(3, min(10, -(-100 // steps_per_epoch))))
    lr = _float(hyper.get("learning_rate_multiplier"), p + "learning_rate_multiplier", 0.0, 100.0, 1.0, lo_open=True)
    max_len = _int(hyper.get("max_seq_length"), p + "max_seq_length", 16, model_max_len, min(2048, model_max_len))
    interval = _int(hyper.get("checkpoint_interval"), p + "checkpoint_interval", 1, 1_000_000, 0)
    warmup = _float(hyper.get("warmup_ratio"), p + "warmup_ratio", 0.0, 0.5, 0.03)
    r = _int(lora.get("r"), "lora.r", 1, MAX_RANK, 8)
    alpha = _float(lora.get("alpha"), "lora.alpha", 0.0, 1e4, 2.0 * r, lo_open=True)
    dropout = _float(lora.get("dropout"), "lora.dropout", 0.0, 0.9, 0.0)
    # "all-linear" (PEFT's word, and the default): every projection of the layers, whatever the family
    # calls them (q_proj... in Llama, query_key_value... in Falcon, Wqkv... in MPT)
    targets = lora.get("target_modules", list(DEFAULT_TARGETS))
    if targets == "all-linear":
        targets = list(DEFAULT_TARGETS)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidRequestError("lora.target_modules must be a non-empty list of projection names (q_proj, ...) "
                                  "or \"all-linear\"", param="lora.target_modules")
    return TrainSettings(epochs, batch, lr, r, alpha, dropout, sorted(set(targets)), max_len, interval, warmup)
