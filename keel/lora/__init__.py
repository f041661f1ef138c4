"""LoRA adapters: the PEFT format and its validation (adapter.py), batched execution inside each
projection (layers.py), and the registry with its host-memory and resident tiers (manager.py)."""

from keel.lora.request import LoRARequest

__all__ = ["LoRARequest"]
