"""The adapter a request asks for, in the offline API. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRARequest:
    """An adapter by name, and the folder to load it from if it is not registered yet."""
    name: str
    path: str | None = None
